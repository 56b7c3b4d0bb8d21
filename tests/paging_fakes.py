"""Stand-ins for the paging tests: a sink that takes every alert, a clock the test moves, and a pipeline component
run on a thread of its own."""

from __future__ import annotations

import contextlib
import threading
import time


class Hook:
    name = "webhook"
    pages_people = True

    def accepts(self, alert):
        return True


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@contextlib.contextmanager
def running(target, component, wait: float = 30.0):
    """`target(component, stop)` on a thread until the block ends."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(component, stop))
    thread.start()
    try:
        yield component
    finally:
        stop.set()
        thread.join(wait)
