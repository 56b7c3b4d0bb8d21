"""Prometheus metrics of the ingest tier, served as text on /metrics (`trainwire consume --metrics-port`), on
loopback unless `metrics_host` (`--metrics-host`) says otherwise: the endpoint has no authentication."""

from __future__ import annotations

import ipaddress
import socket
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("trainwire_ingest_consumed", "Records polled from the transport", registry=r)
        self.stored = Counter("trainwire_ingest_stored", "Events inserted into ClickHouse", registry=r)
        self.redeliveries_skipped = Counter("trainwire_ingest_redeliveries_skipped",
                                            "Redelivered events left out because they were already stored",
                                            registry=r)
        self.dead_lettered = Counter("trainwire_ingest_dead_lettered", "Records sent to the dead letters",
                                     registry=r)
        self.alerts = Counter("trainwire_ingest_alerts", "Alerts raised or resolved", registry=r)
        self.retries = Counter("trainwire_ingest_retries", "Batches dropped and re-read after a failure",
                               registry=r)
        self.lag = Gauge("trainwire_ingest_lag", "Records in the transport not yet stored; NaN while unknown "
                         "(no partitions assigned yet, or the broker does not answer)", registry=r)
        self.since_stored = Gauge("trainwire_ingest_seconds_since_stored", "Seconds since a batch was last stored "
                                  "and committed (or since start): grows while ingest is stalled", registry=r)
        self.batch_rows = Histogram("trainwire_ingest_batch_rows", "Records per flushed batch", registry=r,
                                    buckets=(10, 100, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000))
        self.insert_seconds = Histogram("trainwire_ingest_insert_seconds", "Time to insert one batch", registry=r,
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def serve(self, port: int, address: str = "127.0.0.1") -> tuple[str, int]:
        """Serves /metrics from a thread; the address and port it listens on."""
        if not is_loopback(address):
            print(f"trainwire: warning: metrics on {address}:{port} can be read by anyone who reaches that address "
                  "(no authentication); the default is 127.0.0.1", file=sys.stderr, flush=True)
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server.server_address[:2]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) means this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
