"""Who holds a page of the outbox, and whether that holder is still alive.

A holder is one open outbox in one process, named `machine|pid|start|token`. On the same machine another process
can tell at once whether a holder died: its pid is gone, or now belongs to a process that started at another time
(a reused pid). A holder on another machine (another host, container or boot) cannot be checked this way; it is
alive while it keeps renewing its lease.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

_HAVE_PROC = Path("/proc/self/stat").exists()
_RELEASED = "released:"  # a holder that let go of a page without recording its outcome
_open_tokens: set[str] = set()  # holders of this process whose outbox is still open
_open_lock = threading.Lock()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _this_machine() -> str:
    """The host, its boot and this process's pid namespace: two processes with the same value see the same pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}:{_read('/proc/sys/kernel/random/boot_id')}:{namespace}"


def process_start(pid: int) -> str | None:
    """When the kernel started process `pid` (clock ticks since boot; "" where it cannot say); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes() if _HAVE_PROC else b""
    except OSError:  # gone, or hidden from this user (hidepid): ask the kernel whether the pid exists
        stat = b""
    if not stat:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold spaces
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped by its parent
        return None
    return fields[19].decode()


THIS_MACHINE = _this_machine()


def _this_process() -> str:
    return f"{THIS_MACHINE}|{os.getpid()}|{process_start(os.getpid()) or ''}"


def new_holder() -> str:
    holder = f"{_this_process()}|{uuid.uuid4().hex[:12]}"
    with _open_lock:
        _open_tokens.add(holder)
    return holder


def let_go(holder: str) -> None:
    with _open_lock:
        _open_tokens.discard(holder)


def released(holder: str) -> str:
    return f"{_RELEASED}{holder}"


def is_alive(holder: str) -> bool | None:
    """Whether the holder's process still runs (and, in this process, its outbox is still open); None where this
    machine cannot tell."""
    if holder.startswith(_RELEASED):
        return False
    machine, _, rest = holder.partition("|")
    pid, _, rest = rest.partition("|")
    start, _, _token = rest.partition("|")
    if machine != THIS_MACHINE or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        with _open_lock:
            return holder in _open_tokens
    started = process_start(int(pid))
    return started is not None and started in (start, "")


def describe(holder: str) -> str:
    """`pid 1234 on host-a`, for a log line."""
    machine, _, rest = holder.removeprefix(_RELEASED).partition("|")
    return f"pid {rest.partition('|')[0]} on {machine.partition(':')[0]}" if rest else repr(holder)
