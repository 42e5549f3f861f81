"""Registry keys: Ed25519 PEM files and the TUF signers made from them (docs/security.md).

The registry uses two kinds of keys. Root keys are offline: a threshold of them signs each root
version (``flywheel-registry``), and the server never holds them. The online key signs the
targets, snapshot and timestamp metadata in the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from fleet.agent.config import warn_if_world_readable


PASSPHRASE_ENV = "FLYWHEEL_KEY_PASSPHRASE"  # set: new keys are written encrypted with it, and encrypted keys opened with it


class KeyFileError(ValueError):
    """A key file that is missing or not an Ed25519 key."""


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def generate_keypair(private_path: str | Path) -> SSlibKey:
    """Write a new Ed25519 private key (PEM, created 0600, never through an existing file or link; encrypted with
    ``$FLYWHEEL_KEY_PASSPHRASE`` when it is set) and its public key beside it (``.pub``); return the public key."""
    private_path = Path(private_path)
    private = Ed25519PrivateKey.generate()
    if not private_path.parent.exists():
        private_path.parent.mkdir(parents=True, mode=0o700)
    passphrase = _passphrase()
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{private_path} exists (a file, or a link to one): a new key is never written through it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    private_path.with_suffix(".pub").write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return SSlibKey.from_crypto(private.public_key())


def load_signer(private_path: str | Path, *, create: bool = False) -> CryptoSigner:
    """The signer for the Ed25519 private key at ``private_path`` (made first when ``create`` and missing); an
    encrypted key is opened with ``$FLYWHEEL_KEY_PASSPHRASE``."""
    path = Path(private_path)
    if create and path.is_symlink() and not path.exists():
        raise KeyFileError(f"{path} is a link to {os.readlink(path)}, which does not exist: a new key is never written through a link")
    if create and not path.exists():
        generate_keypair(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the private key {path} ({exc.__class__.__name__}: {exc})") from None
    warn_if_world_readable(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:  # encrypted, no passphrase given; or a passphrase given for a key stored without one
        if _passphrase() is None:
            raise KeyFileError(f"the private key {path} is encrypted: set {PASSPHRASE_ENV} to its passphrase") from None
        key = _load(path, data, None)
    except ValueError as exc:
        raise KeyFileError(f"cannot read the private key {path} ({exc}; is {PASSPHRASE_ENV} its passphrase?)" if b"ENCRYPTED" in data
                           else f"cannot read the private key {path} ({exc.__class__.__name__}: {exc})") from None  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


def _load(path: Path, data: bytes, password: bytes | None):
    try:
        return serialization.load_pem_private_key(data, password=password)
    except (TypeError, ValueError) as exc:
        raise KeyFileError(f"cannot read the private key {path} ({exc.__class__.__name__}: {exc})") from None
