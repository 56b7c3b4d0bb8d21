"""What a run was made with: package versions, installed packages, container, hardware, git state, file hashes.

A probe answers None (or leaves its key out) for what this machine lacks: no GPU, no git, no container digest.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "llamafactory", "trainwire")
# No runtime exposes the image digest to the container by a standard name: the job spec or the image build sets one.
IMAGE_DIGEST_VARIABLES = ("CONTAINER_IMAGE_DIGEST", "IMAGE_DIGEST")


def hostname() -> str:
    return socket.gethostname()


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "os": platform.platform()}
    first_found = _scan().first_found
    versions |= {name: first_found[name] for name in _PACKAGES if name in first_found}
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["cuda"] = torch.version.cuda  # the CUDA toolkit torch was built with
    # asking for cuDNN's version loads the library (~0.1 s): only where there is a GPU for it to run on
    if torch is not None and torch.cuda.is_available() and torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return versions


def installed_packages() -> list[str]:
    """`name==version` of every installed distribution, names normalised (PEP 503), sorted, once each."""
    return list(_scan().lines)


class _Installed:
    """The installed distributions, read once: sorted `name==version` lines, and each name's version as
    `importlib.metadata.version` answers it (the first found on sys.path)."""

    def __init__(self) -> None:
        lines, self.first_found = set(), {}
        for dist in metadata.distributions():
            name, version = _name_and_version(dist)
            if name:
                name = re.sub(r"[-_.]+", "-", name).lower()
                lines.add(f"{name}=={version}")
                self.first_found.setdefault(name, version)
        self.lines = tuple(sorted(lines))


def _name_and_version(dist: metadata.Distribution) -> tuple[str | None, str | None]:
    """Name and Version from the metadata file's headers, as `dist.metadata` reads them, without parsing the
    whole file as e-mail (0.5–1 ms a distribution, most of the cost of a scan; the headers end at the first
    blank line)."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("") or ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, colon, value = line.partition(":")
        key = key.lower()
        if colon and key in ("name", "version") and key not in found:
            found[key] = value.strip()
            if len(found) == 2:
                break
    return found.get("name"), found.get("version")


_scanned: tuple[tuple, _Installed] | None = None
_scan_lock = threading.Lock()


def _scan() -> _Installed:
    """The installed distributions, scanned once per process while sys.path and its directories stay as they were
    (installing or removing a package changes its directory's modification time, and the list is read again)."""
    global _scanned
    with _scan_lock:
        key = _path_state()
        if _scanned is None or _scanned[0] != key:
            _scanned = (key, _Installed())
        return _scanned[1]


def _path_state() -> tuple:
    state = []
    for entry in sys.path:
        try:
            state.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            state.append((entry, None))
    return tuple(state)


def prefetch_packages() -> None:
    """Scan the installed distributions on a background thread now, so that run started (at train begin) finds
    the list read."""
    threading.Thread(target=_scan, name="trainwire-packages", daemon=True).start()


def packages_sha256(packages: list[str] | None = None) -> str:
    """One hash for the whole environment: equal exactly when the installed name==version lists are equal."""
    lines = installed_packages() if packages is None else sorted(packages)
    return sha256_bytes("".join(f"{line}\n" for line in lines).encode())


def container_image_digest() -> str | None:
    return next((os.environ[name] for name in IMAGE_DIGEST_VARIABLES if os.environ.get(name)), None)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry, e.g. an arbitrary container uid
        return ""


def determinism_flags() -> dict[str, bool | None]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {"cudnn_deterministic": None, "cudnn_benchmark": None, "deterministic_algorithms": None}
    return {"cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def hardware() -> dict[str, Any]:
    """GPUs this process can use (torch.cuda), with driver and driver CUDA version from NVML; nulls without."""
    found: dict[str, Any] = {"gpu_type": None, "gpu_count": None, "gpu_driver_version": None, "cuda_version": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        count = torch.cuda.device_count()
        found["gpu_count"] = count
        if count:
            found["gpu_type"] = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(count)}))
    found.update(_nvml_versions())
    return found


def _nvml_versions() -> dict[str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no pynvml, no driver (NVMLError), no libnvidia-ml (OSError): a CPU node
        log.debug("trainwire: no NVML (%s)", err)
        return {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040 for 12.4
        return {"gpu_driver_version": driver.decode() if isinstance(driver, bytes) else driver,
                "cuda_version": f"{cuda // 1000}.{cuda % 1000 // 10}"}
    except pynvml.NVMLError as err:
        log.debug("trainwire: NVML has no driver versions (%s)", err)
        return {}
    finally:
        pynvml.nvmlShutdown()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def sha256_bytes(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def git_state(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding `path`, or (None, None) outside git (or before its first commit).

    One `git status` gives both (the commit in its branch header), one process fewer than `git rev-parse HEAD`."""
    cwd = str(path or Path.cwd())
    try:
        lines = subprocess.run(
            ["git", "status", "--porcelain=v2", "--branch"], cwd=cwd, capture_output=True, text=True, timeout=5,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, None
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), "(initial)")
    if commit == "(initial)":
        return None, None
    return commit, any(not line.startswith("# ") for line in lines)
