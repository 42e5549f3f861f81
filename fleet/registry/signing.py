"""Registry keys: Ed25519 PEM files and the TUF signers made from them (docs/security.md).

The registry uses two kinds of keys. Root keys are offline: a threshold of them signs each root
version (``flywheel-registry``), and the server never holds them. The online key signs the
targets, snapshot and timestamp metadata in the server.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey


class KeyFileError(ValueError):
    """A key file that is missing or not an Ed25519 key."""


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def generate_keypair(private_path: str | Path) -> SSlibKey:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key beside it (``.pub``); return the public key."""
    private_path = Path(private_path)
    private = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    private_path.chmod(0o600)
    private_path.with_suffix(".pub").write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return SSlibKey.from_crypto(private.public_key())


def load_signer(private_path: str | Path, *, create: bool = False) -> CryptoSigner:
    """The signer for the Ed25519 private key at ``private_path`` (made first when ``create`` and missing)."""
    path = Path(private_path)
    if create and not path.exists():
        generate_keypair(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the private key {path} ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))

