"""Consumers: ingest into ClickHouse, streaming detectors, alerts."""
