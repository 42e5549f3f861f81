"""Ed25519 signing of policy manifests. Robots pin the registry's public key.

A signed manifest is the envelope ``{"manifest": {...}, "signature": "<base64>", "key_id": "<hex>"}``;
the signature covers the canonical JSON of the manifest (sorted keys, no whitespace), so any
change to any field breaks it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignatureError(ValueError):
    """The envelope is malformed or its signature does not verify with the pinned key."""


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> Ed25519PublicKey:
    """Write a new PEM key pair (private file mode 0600); return the public key."""
    private = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(
        private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private.public_key()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(manifest: dict, private_key: Ed25519PrivateKey) -> dict:
    signature = private_key.sign(canonical_json(manifest))
    return {"manifest": manifest, "signature": base64.b64encode(signature).decode(), "key_id": key_id(private_key.public_key())}


def verify(envelope: dict, public_key: Ed25519PublicKey) -> dict:
    """The manifest of ``envelope`` if its signature verifies with ``public_key``; else SignatureError."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("manifest"), dict) or not isinstance(envelope.get("signature"), str):
        raise SignatureError("not a signed manifest envelope {manifest, signature, key_id}")
    try:
        signature = base64.b64decode(envelope["signature"], validate=True)
        public_key.verify(signature, canonical_json(envelope["manifest"]))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"bad signature ({exc.__class__.__name__}) for key {key_id(public_key)}") from None
    return envelope["manifest"]
