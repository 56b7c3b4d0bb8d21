"""The stop switch across the processes of one distributed run: every rank stops at the same step."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class RankStopSync:
    """Rank 0 (the one process that hears the stop switch) broadcasts at every step's end whether its run was told
    to stop, as a one-element CPU tensor through a gloo group: created here (a collective, so every rank builds it)
    unless the process group is gloo already, so that the decision never waits on an accelerator."""

    def __init__(self, group: Any):
        self._group = group

    @classmethod
    def for_run(cls, world_size: int, main: bool) -> RankStopSync | None:
        """For a run of `world_size` processes, on every rank; None for one process, or without a process group."""
        if world_size <= 1:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if main:
                log.warning("trainwire: %d processes but no torch.distributed process group: the stop switch could "
                            "not stop every rank; run not opted in", world_size)
            return None
        return cls(None if "gloo" in dist.get_backend() else dist.new_group(backend="gloo"))

    def told(self, stop_here: bool) -> bool:
        """Rank 0's `stop_here`, on every rank (a collective: every rank calls it at the same step)."""
        import torch
        import torch.distributed as dist

        decision = torch.tensor([int(stop_here)])
        dist.broadcast(decision, src=0, group=self._group)
        return bool(decision.item())
