"""A version's files after it left the TUF listing, read back and checked.

The targets metadata lists the newest versions and the stable and canary ones (fleet/registry/store.py,
KEEP_VERSIONS); an older version leaves the listing, not the storage: nothing deletes a target file, so
``tuf/targets/policies/<version:08d>/`` still holds ``<sha256>.manifest.json`` and
``<sha256>.weights.safetensors`` (each named by the sha256 of its content). A rollback to such a version
(docs/security.md, "Rolling the fleet back") reads them from there. No signature covers them any more
(the targets metadata that listed them is pruned), so they are taken only as the registry wrote them:

    the manifest   its content hashes to its name, it is the canonical JSON the registry writes
                   (fleet/registry/signing.py), a manifest (fleet/registry/manifest.py) of that version,
                   and, where the history recorded one for the version (``manifest_sha256``, recorded at
                   each release since this build), the sha256 recorded
    the weights    the file the manifest names: its sha256 and size are the manifest's

A version folder may hold two manifests: a publisher that lost a race to another writer stored its own
under the same number before it made its change again under the next one. The history's sha256 tells
them apart; where it records none (a release of an earlier build), two is one too many and nothing is
taken. The republished release is signed anew, and robots check it as any other (fleet/registry/pull.py).
"""

from __future__ import annotations

import json
import re

from fleet.registry.files import RegistryFiles
from fleet.registry.manifest import FORMAT, REQUIRED, manifest_target, sha256_hex
from fleet.registry.signing import canonical_json

MANIFEST_SUFFIX = ".manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class NotKept(ValueError):
    """A version's kept files are gone, or are not what the registry wrote: the text says which file and what is wrong."""


def folder_of(version: int) -> str:
    """Where a version's target files are stored, under the TUF repository's files (``targets/policies/<version:08d>``)."""
    return "targets/" + manifest_target(version).rpartition("/")[0]


def has_kept_manifest(files: RegistryFiles, version: int) -> bool:
    """Whether a manifest file is still stored for ``version`` (one listing; nothing read or checked)."""
    return any(name.endswith(MANIFEST_SUFFIX) for name in files.list(folder_of(version)))


def kept_manifest(files: RegistryFiles, version: int, recorded_sha256: str | None) -> dict:
    """``version``'s manifest as the registry wrote it, read from ``files`` (the TUF repository's); :class:`NotKept` if
    there is none, none that checks out, more than one (with no ``recorded_sha256`` to choose), or not the one recorded."""
    folder = folder_of(version)
    names = [name for name in files.list(folder) if name.endswith(MANIFEST_SUFFIX)]
    if not names:
        raise NotKept(f"v{version}'s files are gone: {files.location}/{folder} holds no manifest")
    found, wrong = {}, []
    for name in names:
        data = files.read(f"{folder}/{name}")
        problem = _manifest_problem(data, name, version)
        if problem is None:
            found[name.removesuffix(MANIFEST_SUFFIX)] = json.loads(data)
        else:
            wrong.append(f"{name}: {problem}")
    if recorded_sha256 is not None:
        if recorded_sha256 in found:
            return found[recorded_sha256]
        raise NotKept(
            f"the manifest the history records for v{version} (sha256 {recorded_sha256[:16]}...) is not in {files.location}/{folder} "
            f"as the registry wrote it" + (f" ({'; '.join(wrong)})" if wrong else " (it is gone)")
        )
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        raise NotKept(
            f"{files.location}/{folder} holds {len(found)} manifests of v{version} (a publisher that lost a race leaves one) and the "
            "history records the sha256 of neither (a release of an earlier build): which one robots ran cannot be told"
        )
    raise NotKept(f"no manifest of v{version} in {files.location}/{folder} is as the registry wrote it: {'; '.join(wrong)}")


def kept_weights(files: RegistryFiles, manifest: dict) -> bytes:
    """The weights ``manifest`` (a kept manifest) names, checked against its sha256 and size; :class:`NotKept` if they are
    gone or are other bytes."""
    version, sha256, size = manifest["version"], manifest["weights"]["sha256"], manifest["weights"]["size"]
    name = f"{folder_of(version)}/{sha256}.weights.safetensors"
    data = files.read(name)
    if data is None:
        raise NotKept(f"v{version}'s weights are gone: {files.location}/{name} does not exist")
    if len(data) != size or sha256_hex(data) != sha256:
        raise NotKept(f"v{version}'s weights {files.location}/{name} are not the file its manifest records (sha256 {sha256[:16]}..., {size} bytes): they were changed since")
    return data


def _manifest_problem(data: bytes | None, name: str, version: int) -> str | None:
    """What is wrong with a kept manifest file's ``data`` (None: it is the registry's manifest of ``version``)."""
    if data is None:
        return "gone while it was read"
    if sha256_hex(data) != name.removesuffix(MANIFEST_SUFFIX):
        return "its content does not hash to its name (changed since it was written)"
    try:
        manifest = json.loads(data)
    except ValueError:
        return "not JSON"
    if not isinstance(manifest, dict) or canonical_json(manifest) != data:
        return "not the canonical JSON the registry writes"
    missing = [key for key in REQUIRED if key not in manifest]
    if missing or manifest["format"] != FORMAT or manifest["version"] != version:
        return f"not a manifest of v{version} (format {manifest.get('format')!r}, version {manifest.get('version')!r}, missing {missing})"
    weights = manifest["weights"]
    if not isinstance(weights, dict) or not _SHA256.fullmatch(str(weights.get("sha256"))) or type(weights.get("size")) is not int:
        return "its weights entry is not {sha256, size}"
    return None
