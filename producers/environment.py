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
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["cuda"] = torch.version.cuda  # the CUDA toolkit torch was built with
    if torch is not None and torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return versions


def installed_packages() -> list[str]:
    """`name==version` of every installed distribution, names normalised (PEP 503), sorted, once each."""
    found = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.add(f"{re.sub(r'[-_.]+', '-', name).lower()}=={dist.version}")
    return sorted(found)


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
