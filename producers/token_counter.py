"""Tokens trained on, for `tokens_per_s` when the Trainer counts none (its default)."""

from __future__ import annotations


class TokenCounter:
    """The tokens of the batches the model trains on, counted by a forward pre-hook: the attention mask's ones (the
    tokens that are not padding), else the input ids. The sum stays on the batch's device until it is read at a
    logging step, so counting never makes the training loop wait for the accelerator."""

    def __init__(self, model):
        self._counted = 0
        self._on_device = None
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args: tuple, kwargs: dict) -> None:
        if not module.training:  # an evaluation's batches are no training throughput
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if getattr(mask, "ndim", 0) == 2:
            total = mask.sum()
            self._on_device = total if self._on_device is None else self._on_device + total
        elif hasattr(ids, "numel"):
            self._counted += ids.numel()

    def read(self) -> int:
        if self._on_device is not None:
            self._counted += int(self._on_device)
            self._on_device = None
        return self._counted

    def remove(self) -> None:
        self._hook.remove()
