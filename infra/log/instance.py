"""A consumer's Kafka `group.instance.id` (static group membership): stable across a restart, so the broker hands
the restarted consumer its partitions at once instead of waiting out the dead member's session, and distinct for
consumers running side by side, since joining under an id that is in use fences the other member out for good.

Without an explicit id a consumer takes `<hostname>-<group>-<slot>`, where the slot is the lowest one free among
lock files under the trainwire home, held (flock) for the consumer's life. The kernel drops the lock of a process
that dies, even by SIGKILL, so its restart takes the same slot back and rejoins as the same member.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path

MAX_INSTANCE_ID = 249  # the broker refuses longer ids, and characters outside [A-Za-z0-9._-]
_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]")
MAX_SLOTS = 1024


class ConsumerSlot:
    """The lowest free slot of `group` in `directory`, held until `release()` or the process's end."""

    def __init__(self, directory: Path, group: str):
        self._fd: int | None = None
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(MAX_SLOTS):
            fd = os.open(directory / f"{_legal(group)}.{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.index, self._fd = index, fd
            return
        raise OSError(f"{MAX_SLOTS} consumers of group {group} already run under {directory}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def slot_instance_id(group: str, slot: int) -> str:
    host = _legal(socket.gethostname()) or "host"
    suffix = f"-{_legal(group)}-{slot}"
    return host[:MAX_INSTANCE_ID - len(suffix)] + suffix


def check_instance_id(instance_id: str) -> str:
    if not instance_id or len(instance_id) > MAX_INSTANCE_ID or _ILLEGAL.search(instance_id):
        raise ValueError(f"invalid consumer instance id {instance_id!r}: use 1 to {MAX_INSTANCE_ID} of "
                         f"A-Z a-z 0-9 . _ -")
    return instance_id


def _legal(name: str) -> str:
    return _ILLEGAL.sub("_", name)
