"""What the sender thread saw of one run: what it lost, and the summary its run ended reports.

The summary (last step, first and last loss, best eval, best checkpoint) is kept from the events that were valid
and sent, on the sender thread, in the order they were logged: one bad value drops its own event and can never make
the run ended (or a heartbeat) invalid, and the summary agrees with what the store holds.
"""

from __future__ import annotations

from pydantic import BaseModel

from trainwire.schemas import Checkpoint, Eval, Heartbeat, RunEnded, Step

from .values import number


class RunTally:
    def __init__(self) -> None:
        self.dropped = 0  # queue full, or the transport refused the event
        self.invalid = 0  # refused by validation or Avro encoding
        self.last_step: int | None = None
        self.initial_loss: float | None = None
        self.final_loss: float | None = None
        self.best_eval: tuple[float, int] | None = None  # (eval loss, step): the lowest finite one
        self.best_checkpoint: str | None = None

    def complete(self, event_type: type[BaseModel], fields: dict) -> None:
        """Fill in what the run knows before `fields` are validated: the summary of what was sent before."""
        if event_type is Heartbeat:
            fields["step"] = self.last_step
            self._counts(fields)
        elif event_type is RunEnded:
            if fields.get("completed_steps") is None:
                fields["completed_steps"] = self.last_step
            fields.update(initial_loss=self.initial_loss, final_loss=self.final_loss,
                          best_eval_loss=self.best_eval[0] if self.best_eval else None,
                          best_checkpoint=self.best_checkpoint)
            self._counts(fields)
        elif event_type is Checkpoint and fields.get("is_best") is None and self.best_eval is not None:
            loss = None if fields.get("eval_loss") is None else number(fields["eval_loss"])
            if loss is not None:
                fields["is_best"] = loss <= self.best_eval[0]

    def _counts(self, fields: dict) -> None:
        fields.update(events_dropped=self.dropped, events_invalid=self.invalid)

    def sent(self, event: BaseModel) -> None:
        """Keep the summary from an event that was valid and handed to the transport."""
        kind = type(event)
        if kind is Step:
            self.last_step = event.step
            if event.loss is not None:
                if self.initial_loss is None:
                    self.initial_loss = event.loss
                self.final_loss = event.loss
        elif kind is Eval:
            loss = event.eval_loss
            if loss is not None and loss == loss and abs(loss) != float("inf") and (
                    self.best_eval is None or loss < self.best_eval[0]):
                self.best_eval = (loss, event.step)
        elif kind is Checkpoint and event.is_best:
            self.best_checkpoint = event.path
