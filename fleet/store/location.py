"""Where a store or a registry lives: a local directory or ``s3://bucket/prefix``. The one parser of
those locations (the episode store's path, the policy registry's location, a run's folders);
light, so configs validate with it (fleet/store/backend.py opens the storage it names)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


WHERE_STORES_ARE = "a run's <run_dir>/store, or flywheel-server's fleet.store.path"  # what the shell tools tell a user to pass as --store


class StoreLocationError(ValueError):
    """A store path that names no usable location (a malformed ``s3://`` URL, no bucket)."""


@dataclasses.dataclass(frozen=True)
class Location:
    """A local directory (``path``) or an S3 bucket and key prefix."""

    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @classmethod
    def parse(cls, value: str, what: str = "store path") -> Location:
        """``what``: how errors name the value (the episode store's path, the policy registry's location)."""
        text = str(value)
        if not text.startswith("s3://"):
            if "://" in text:
                raise StoreLocationError(f"{what} {text!r}: only local directories and s3://bucket/prefix are supported")
            return cls(path=Path(text))
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise StoreLocationError(f"{what} {text!r} names no bucket: use s3://bucket/prefix")
        return cls(bucket=bucket, prefix=prefix.strip("/"))

    @classmethod
    def of(cls, where: Location | Path | str) -> Location:
        return where if isinstance(where, Location) else cls.parse(str(where))

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return str(self.path) if self.is_local else f"s3://{self.bucket}/{self.prefix}"
