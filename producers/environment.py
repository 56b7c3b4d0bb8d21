"""What a run was made with: package versions, git state, file hashes."""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "llamafactory", "trainwire")


def hostname() -> str:
    return socket.gethostname()


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "os": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["cuda"] = torch.version.cuda
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def sha256_bytes(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def git_state(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding `path`, or (None, None) outside git."""
    cwd = str(path or Path.cwd())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(dirty)
