"""Whether this process may still hold an embedded store. chdb serves one data directory (or ':memory:') per process,
so a client a test left unclosed in a reference cycle keeps the next test from opening its own store until the
garbage collector frees it. A full collection walks every object the tests made or imported (~0.45 s of CPU once
torch is in): the suite runs one after a test only when some chdb connection is still open, not after every test."""

from __future__ import annotations

import functools
import sys
import threading
import weakref

_MODULE = "chdb.state.sqlitelike"  # every chdb connection, clickhouse-connect's included, is its Connection
_connections: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()  # a thread a test left running may open one while the set is read


def _track(connection_class: type) -> None:
    opening = connection_class.__init__

    @functools.wraps(opening)
    def __init__(self, *args, **kwargs):
        opening(self, *args, **kwargs)
        with _lock:
            _connections.add(self)

    __init__.tracked = True
    connection_class.__init__ = __init__


def may_hold_one() -> bool:
    """True while a chdb connection made in this process is still open (closed ones set `_conn` to None), and the
    first time chdb is seen imported, when the connections opened so far were not watched."""
    module = sys.modules.get(_MODULE)
    if module is None:
        return False
    if not getattr(module.Connection.__init__, "tracked", False):
        _track(module.Connection)
        return True
    with _lock:
        connections = list(_connections)
    return any(getattr(connection, "_conn", True) is not None for connection in connections)
