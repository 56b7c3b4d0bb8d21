"""Pick the wire format from settings."""

from __future__ import annotations

from trainwire.schemas import Codec, SingleObjectCodec

from .config import Settings


def codec_for(settings: Settings) -> Codec:
    return SingleObjectCodec()
