"""Where the registry's files live: a local directory, or S3-compatible object storage.

The registry (fleet/registry/store.py) and its TUF repository (tuf_repo.py) touch their files
only through a :class:`RegistryFiles`, by names relative to the registry
(``tuf/metadata/timestamp.json``, ``history.jsonl``), so the layout is the same on both:

    LocalFiles   a directory (the default ``fleet.registry.dir``); every file is written whole
                 (write, fsync, rename), so a reader sees the old file or the new one
    S3Files      ``s3://bucket/prefix``: the same names as keys under the prefix, each PUT whole
                 (S3 has read-after-write consistency per object); requests are signed with the
                 AWS_* variables the episode store reads (fleet/registry/s3.py)

Several writers (server replicas on several hosts, a key ceremony beside a running server) are
kept apart by conditional writes, never by a lock held in one process (docs/security.md, "The
registry on object storage"):

    write(name, data, if_absent=True)   raises WriteConflict if ``name`` exists (S3:
                                        ``If-None-Match: *``): for names written once
    write(name, data, if_match=tag)     raises WriteConflict unless ``name`` is still the version
                                        ``read_tagged`` gave ``tag`` for (S3: ``If-Match: <ETag>``):
                                        a compare-and-swap
    append(name, data)                  O_APPEND on disk; on S3 a read-modify-write under If-Match,
                                        retried when another writer appended first (TimeoutError
                                        after APPEND_ATTEMPTS: never a WriteConflict, which would
                                        make the registry redo a change it already committed)

On disk the two conditional writes hold an ``flock`` on the file's folder while they check and
rename: every writer of a local registry is on that host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from sim.durable import folder_lock, fsync_dir, write_durably

CHUNK = 1 << 16  # bytes per piece when a file is served
APPEND_ATTEMPTS = 32
_NAME = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")


class WriteConflict(RuntimeError):
    """A conditional write lost: another writer created the name, or changed it since it was read."""


@dataclasses.dataclass
class Opened:
    """A file opened to be served: its ``size``, ``chunks(start, end)`` (its bytes [start, end) in
    pieces; closes it when done) and ``close()`` for when no body is sent."""

    size: int
    chunks: Callable[[int, int], Iterator[bytes]]
    close: Callable[[], None]


class RegistryFiles(Protocol):
    location: str  # for messages: the directory, or s3://bucket/prefix
    local_dir: Path | None  # the directory on this host; None on object storage

    def sub(self, folder: str) -> RegistryFiles: ...
    def read(self, name: str) -> bytes | None: ...
    def read_tagged(self, name: str) -> tuple[bytes, str] | None: ...
    def open(self, name: str) -> Opened | None: ...
    def write(self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None, cache_control: str | None = None) -> str: ...
    def append(self, name: str, data: bytes) -> None: ...
    def list(self, folder: str) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def delete(self, name: str) -> None: ...


def open_files(where: str | Path | RegistryFiles) -> RegistryFiles:
    """The files at ``where``: a directory, ``s3://bucket/prefix`` (parsed as the episode store's
    location is), or a RegistryFiles already."""
    if isinstance(where, LocalFiles | S3Files):
        return where
    if isinstance(where, Path) and str(where).startswith("s3:"):
        raise ValueError(f"registry location {where}: pass s3:// locations as strings (a Path keeps one slash of '//')")
    from fleet.store.location import Location  # one parser of store and registry locations

    location = Location.parse(str(where), what="registry location")
    if location.is_local:
        return LocalFiles(location.path)
    from fleet.registry.s3 import S3Client, S3Settings

    return S3Files(S3Client(location.bucket, S3Settings.from_env()), location.prefix)


def _check(name: str) -> str:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise ValueError(f"not a registry file name: {name!r}")
    return name


def content_tag(data: bytes) -> str:
    """A local file's version tag: the sha256 of its content."""
    return hashlib.sha256(data).hexdigest()


class LocalFiles:
    """The registry in a local directory (``root``)."""

    def __init__(self, root: str | Path):
        self.local_dir = Path(root)
        self.location = str(self.local_dir)

    def sub(self, folder: str) -> LocalFiles:
        return LocalFiles(self.local_dir / _check(folder))

    def read(self, name: str) -> bytes | None:
        try:
            return (self.local_dir / _check(name)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        data = self.read(name)
        return None if data is None else (data, content_tag(data))

    def open(self, name: str) -> Opened | None:
        try:
            f = open(self.local_dir / _check(name), "rb")  # noqa: SIM115 - closed by chunks() or close()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return Opened(os.fstat(f.fileno()).st_size, lambda start, end: _file_chunks(f, start, end), f.close)  # size of the open file: a rename cannot mix two

    def write(self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None, cache_control: str | None = None) -> str:
        path = self.local_dir / _check(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not if_absent and if_match is None:
            write_durably(path, data)
            return content_tag(data)
        with folder_lock(path.parent):
            if if_absent and path.exists():
                raise WriteConflict(f"{path} exists: another writer made it first")
            if if_match is not None and (self.read_tagged(name) or (b"", None))[1] != if_match:
                raise WriteConflict(f"{path} changed since it was read: another writer replaced it")
            write_durably(path, data)
        return content_tag(data)

    def append(self, name: str, data: bytes) -> None:
        path = self.local_dir / _check(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the history records the versions given: a power cut must not lose one (a restore's floor)
        if new:
            fsync_dir(path.parent)

    def list(self, folder: str) -> list[str]:
        directory = self.local_dir / _check(folder)
        return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []

    def exists(self, name: str) -> bool:
        return (self.local_dir / _check(name)).is_file()

    def delete(self, name: str) -> None:
        (self.local_dir / _check(name)).unlink(missing_ok=True)


class S3Files:
    """The registry under ``prefix`` in one bucket (``client``)."""

    local_dir = None

    def __init__(self, client, prefix: str = ""):
        self.client, self.prefix = client, prefix.strip("/")
        self.location = f"s3://{client.bucket}/{self.prefix}"

    def sub(self, folder: str) -> S3Files:
        return S3Files(self.client, self._key(folder))

    def _key(self, name: str) -> str:
        return "/".join(part for part in (self.prefix, _check(name)) if part)

    def read(self, name: str) -> bytes | None:
        response = self.client.get(self._key(name))
        return None if response is None else response.content

    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        response = self.client.get(self._key(name))
        return None if response is None else (response.content, response.headers["etag"])

    def open(self, name: str) -> Opened | None:
        key = self._key(name)
        response = self.client.head(key)
        if response is None:
            return None
        return Opened(int(response.headers["content-length"]), lambda start, end: self.client.stream(key, start, end), lambda: None)

    def write(self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None, cache_control: str | None = None) -> str:
        from fleet.registry.s3 import PreconditionFailed

        headers = {"If-None-Match": "*"} if if_absent else {"If-Match": if_match} if if_match is not None else {}
        if cache_control:
            headers["Cache-Control"] = cache_control  # kept as object metadata: a bucket or CDN serving the file sends it
        try:
            return self.client.put(self._key(name), data, headers)
        except PreconditionFailed as exc:
            raise WriteConflict(f"{self.location}/{name}: another writer {'made it first' if if_absent else 'replaced it since it was read'} ({exc.code})") from None

    def append(self, name: str, data: bytes) -> None:
        for _ in range(APPEND_ATTEMPTS):
            current = self.read_tagged(name)
            try:
                if current is None:
                    self.write(name, data, if_absent=True)
                else:
                    self.write(name, current[0] + data, if_match=current[1])
                return
            except WriteConflict:
                time.sleep(random.uniform(0.005, 0.05))  # another writer appended first: read again
        raise TimeoutError(f"{self.location}/{name}: {APPEND_ATTEMPTS} appends in a row lost to other writers; try again")

    def list(self, folder: str) -> list[str]:
        prefix = self._key(folder) + "/"
        return sorted(key[len(prefix) :] for key in self.client.list(prefix))

    def exists(self, name: str) -> bool:
        return self.client.head(self._key(name)) is not None

    def delete(self, name: str) -> None:
        self.client.delete(self._key(name))


def _file_chunks(f, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of the open file ``f`` in CHUNK pieces (never the whole file in memory); closes ``f``."""
    with f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                return  # the file shrank: the client sees a short body and TUF refuses it
            left -= len(data)
            yield data
