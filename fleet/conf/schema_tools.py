"""Hydra schemas made from the code's own dataclasses and signatures, so each knob is declared once.

``target_schema(TrainerConfig)`` is a (mutable) dataclass with ``TrainerConfig``'s fields, types
and defaults plus ``_target_`` (and ``_convert_`` when asked): registered in Hydra's ConfigStore,
a YAML node that names an unknown field or gives a value of the wrong type is refused at compose
time, with the key named. ``signature_schema(fn)`` does the same for a function's keyword
arguments. Types OmegaConf cannot check (unions, callables) become ``Any``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

PRIMITIVES = (int, float, str, bool, Path)


def omegaconf_type(hint: Any) -> Any:
    """The nearest type OmegaConf 2.3 checks: primitives, Optional, List, Dict, schemas; else Any."""
    if hint in PRIMITIVES or hint is Any:
        return hint
    if dataclasses.is_dataclass(hint):
        return target_schema(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = omegaconf_type(rest[0])
            return Any if inner is Any else Optional[inner]
        return Any
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in PRIMITIVES else Any
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        return List[omegaconf_type(items[0])] if len(set(items)) == 1 else List[Any]
    if origin in (dict, Mapping) or hint is dict:
        return Dict[str, omegaconf_type(args[1])] if args else Dict[str, Any]
    return Any


def _default(value: Any, hint: Any) -> dataclasses.Field:
    """A dataclass field default OmegaConf accepts: tuples as lists, containers by factory."""
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return dataclasses.field(default=MISSING)
    if dataclasses.is_dataclass(value):
        schema = hint if dataclasses.is_dataclass(hint) else target_schema(type(value))
        kwargs = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.field(default_factory=lambda: schema(**kwargs))
    plain = _plain(value)
    if isinstance(plain, (list, dict)):
        return dataclasses.field(default_factory=lambda: _plain(value))
    return dataclasses.field(default=plain)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def target_schema(cls: type, convert: str | None = None) -> type:
    """A schema for YAML nodes that build ``cls`` with ``_target_`` (nested dataclasses too)."""
    head = [("_target_", str, dataclasses.field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    if convert:
        head.append(("_convert_", str, dataclasses.field(default=convert)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", [*head, *_fields(cls)])


def fields_schema(cls: type, name: str, exclude: tuple[str, ...] = ()) -> type:
    """A schema with ``cls``'s fields but ``exclude``, for a node the code reads itself (no ``_target_``)."""
    return dataclasses.make_dataclass(name, _fields(cls, exclude))


def _fields(cls: type, exclude: tuple[str, ...] = ()) -> list[tuple]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.init and f.name not in exclude:
            hint = omegaconf_type(hints[f.name])
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.append((f.name, hint, _default(value, hint)))
    return out


def signature_schema(fn: Any, name: str, only: tuple[str, ...] | None = None) -> type:
    """A schema of ``fn``'s keyword arguments (or just ``only``), for a node the code passes as ``**kwargs``."""
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values() if (p.name in only if only else p.kind == p.KEYWORD_ONLY)]
    fields = [(p.name, omegaconf_type(hints.get(p.name, Any)), _default(p.default, None)) for p in params]
    return dataclasses.make_dataclass(name, fields)


def extend(schema: type, name: str, **fields: tuple[Any, Any]) -> type:
    """A subclass of ``schema`` with more fields, or some retyped: name=(type, default factory)."""
    extra = [(k, t, dataclasses.field(default_factory=d)) for k, (t, d) in fields.items()]
    return dataclasses.make_dataclass(name, extra, bases=(schema,))


def _schema_keys(node: Any, which, path: str = "") -> list[str]:
    """Through typed nodes: ``which(node's keys, its schema's fields)`` of each, as dotted paths."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, ListConfig):
        return [k for i, v in enumerate(node) for k in _schema_keys(v, which, f"{path}[{i}]")]
    if not isinstance(node, DictConfig):
        return []
    schema = node._metadata.object_type
    out = [f"{path}{k}" for k in which(list(node.keys()), [f.name for f in dataclasses.fields(schema)])] if dataclasses.is_dataclass(schema) else []
    return out + [k for key, v in node.items_ex(resolve=False) for k in _schema_keys(v, which, f"{path}{key}.")]


def unknown_keys(node: Any) -> list[str]:
    """Keys of typed nodes that their schema lacks: Hydra lets ``+key=value`` add them past it."""
    return _schema_keys(node, lambda keys, fields: [k for k in keys if k not in fields])


def missing_keys(node: Any) -> list[str]:
    """Keys of typed nodes' schemas that the node lacks: Hydra lets ``~key`` delete them."""
    return _schema_keys(node, lambda keys, fields: [f for f in fields if f not in keys])


def check(cfg: Any, app: str) -> None:
    """Stop ``app``, before anything runs, with the keys no code reads (added with ``+key=value``), the keys deleted that code
    reads (``~key``) and any value that does not resolve (``${oc.env:UNSET}``), each in one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if unknown := unknown_keys(cfg):
        raise SystemExit(f"{app}: unknown config keys {unknown}: nothing reads them; check their spelling (fleet/conf/schema_*.py lists every key)")
    if missing := missing_keys(cfg):
        raise SystemExit(f"{app}: config keys {missing} were deleted (~key), and the code reads every key: set a value instead (key=value)")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise SystemExit(f"{app}: {key + ': ' if key else ''}{str(exc).strip().splitlines()[0]}") from None
    expand_home(cfg)


def expand_home(node: Any) -> None:
    """Every setting whose value is ``~`` or starts with ``~/`` (a path in the user's home) expanded in place: no code
    expands it, so ``fleet.store.path='~/store'`` made a folder named ``~`` in the working directory, and a token file
    in the home was "not there". Applies what a shell does for an unquoted ``~``."""
    from omegaconf import DictConfig, ListConfig

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node)) if isinstance(node, ListConfig) else ()
    for key in keys:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            expand_home(value)
        elif isinstance(value, str) and (value == "~" or value.startswith("~/")):
            node[key] = os.path.expanduser(value)


def instantiated(node: Any, key: str) -> Any:
    """``node`` instantiated; a value its class refuses as a ValueError naming ``key`` (what the apps print in one line),
    not Hydra's wrapper text and traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as exc:
        raise ValueError(f"{key}: {exc.__cause__ or exc}") from None
