"""Trainer-side producers: the SDK (`Run`, `init`), the Hugging Face callback and the GPU sampler."""

from .control import TrainingStopped
from .gpu import GpuSampler, NvmlSource
from .run import Run
from .session import init
from .values import InvalidRunError

__all__ = ["GpuSampler", "InvalidRunError", "NvmlSource", "Run", "TrainingStopped", "TrainwireCallback", "init"]


def __getattr__(name: str):
    # transformers is heavy: import the callback only for those who use it
    if name == "TrainwireCallback":
        from .hf_callback import TrainwireCallback

        return TrainwireCallback
    raise AttributeError(name)
