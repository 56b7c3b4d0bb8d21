"""Values a training script can hand the SDK that no event can hold (issue 12, items 8–9), each as one call on a run.

Before the SDK was hardened, each of them either killed the sender thread (every later event of every run in the
process silently dropped) or made the run's run ended invalid (the run never ended in the store)."""

from __future__ import annotations

import os
from collections.abc import Callable

from trainwire.producers import Run

SHA = "sha256:" + "0" * 64
NOT_UTF8_PATH = os.fsdecode(b"/ckpt/\xff\xfe-run")  # what os.listdir makes of a file name that is not UTF-8
NOT_UTF8_RECORDED = "/ckpt/\\xff\\xfe-run"

# name → the call; every one of them drops exactly its own event
BAD_CALLS: dict[str, Callable[[Run], None]] = {
    "step 2**63": lambda run: run.log_step(2**63, loss=1.0),
    "tokens 2**70": lambda run: run.log_step(1, loss=1.0, tokens=2**70),
    "loss 'abc'": lambda run: run.log_step(1, loss="abc"),
    "extra key with a lone surrogate": lambda run: run.log_step(1, loss=1.0, **{"bad\ud800": 1.0}),
    "checkpoint size 2**64": lambda run: run.log_checkpoint(
        1, "/ckpt/1", [{"name": "a", "size": 2**64, "sha256": SHA}]),
    "eval loss 'abc'": lambda run: run.log_eval(1, eval_loss="abc"),
    "gpu rank 70000": lambda run: run.log_gpu(rank=70_000, gpu_index=0, gpu_uuid="GPU-0"),
    "step not a number": lambda run: run.log_step("seven"),
    "eval metric with a lone surrogate": lambda run: run.log_eval(1, eval_loss=0.5, **{"\udcff": 1.0}),
}
