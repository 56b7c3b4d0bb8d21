"""Ed25519 keys for the audit log: each entry's hash is signed with a key the store never holds.

Someone who can write to the store can chain entries correctly (the hash function is public) but cannot sign them;
`trainwire audit verify` accepts a signature only from a trusted public key. A key is named by its id, a
fingerprint of the public key, stored with each entry.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_NAME = "audit-key.pem"
PUBLIC_KEY_NAME = "audit-key.pub.pem"
# Domain separation: an entry's signature can never pass for a bundle's, nor the other way round.
ENTRY = b"trainwire-audit-entry:"
BUNDLE = b"trainwire-audit-bundle:"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519:{hashlib.sha256(raw).hexdigest()[:32]}"


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _private_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def _write_once(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` whole or not at all; False if it already exists (another process made it first)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)  # atomic, and refuses to replace a key someone else just made
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()


def write_key_pair(directory: Path, private_name: str = PRIVATE_KEY_NAME,
                   public_name: str = PUBLIC_KEY_NAME) -> tuple[Path, Path]:
    """A new key pair in `directory`: the private key 0600, the public key beside it. Never overwrites."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / private_name, directory / public_name
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists: trainwire never overwrites a signing key")
    private_key = Ed25519PrivateKey.generate()
    if not _write_once(private_path, _private_pem(private_key), 0o600):
        raise FileExistsError(f"{private_path} exists: trainwire never overwrites a signing key")
    public_path.write_text(public_pem(private_key.public_key()))
    return private_path, public_path


def ensure_home_key(home: Path) -> Path:
    """The per-home key, made on first use (the embedded defaults are signed out of the box)."""
    private_path, public_path = home / PRIVATE_KEY_NAME, home / PUBLIC_KEY_NAME
    if not private_path.exists():
        home.mkdir(parents=True, exist_ok=True)
        _write_once(private_path, _private_pem(Ed25519PrivateKey.generate()), 0o600)
    if not public_path.exists():
        public_path.write_text(public_pem(load_private_key(private_path).public_key()))
    return private_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey
    key_id: str

    def sign(self, digest: str, context: bytes = ENTRY) -> str:
        return base64.b64encode(self.private_key.sign(context + digest.encode())).decode()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@lru_cache(maxsize=8)
def _signer(path: str, modified_ns: int) -> Signer:
    private_key = load_private_key(Path(path))
    return Signer(private_key, key_id(private_key.public_key()))


def signer_for(path: Path) -> Signer:
    return _signer(str(path), path.stat().st_mtime_ns)


class TrustedKeys:
    """The public keys whose signatures verify accepts, by key id."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None):
        self.keys: dict[str, Ed25519PublicKey] = {}
        for key in keys or []:
            self.add(key)

    def add(self, key: Ed25519PublicKey) -> None:
        self.keys[key_id(key)] = key

    @classmethod
    def from_pems(cls, pems: list[bytes | str]) -> "TrustedKeys":
        return cls([load_public_key(pem) for pem in pems])

    def pems(self) -> dict[str, str]:
        return {kid: public_pem(key) for kid, key in sorted(self.keys.items())}

    def problem(self, digest: str, signing_key: str, signature: str, context: bytes = ENTRY) -> str | None:
        """Why this signature of `digest` (an entry hash) is not acceptable, or None when it is."""
        key = self.keys.get(signing_key)
        if key is None:
            return f"signed by a key that is not trusted ({signing_key or 'no key id'})"
        try:
            key.verify(base64.b64decode(signature, validate=True), context + digest.encode())
        except (InvalidSignature, ValueError):
            return f"signature does not verify (key {signing_key})"
        return None
