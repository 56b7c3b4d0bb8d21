"""Pick the wire format from settings."""

from __future__ import annotations

from trainwire.schemas import Codec, SingleObjectCodec

from .config import Settings


def codec_for(settings: Settings) -> Codec:
    """The Confluent Schema Registry format when `schema_registry` is set, else Avro single-object encoding."""
    if settings.schema_registry:
        # Imported only when configured: the registry client (httpx, authlib) is not needed otherwise.
        from trainwire.schemas.confluent import ConfluentCodec

        return ConfluentCodec(settings.schema_registry)
    return SingleObjectCodec()
