"""Page storm: `--runs` runs (200) go NaN within `--spread-seconds` (10): how many pages each sink gets, whether they
name every run, how soon the first and the last run are paged, and whether every run's alert is stored.

    .venv/bin/python benchmarks/page_storm_bench.py [--runs 200] [--spread-seconds 10] [--group-wait 10]

`trainwire up` runs as its own process on Kafka and chdb (ingest, detectors, alert consumer) and pages a webhook,
PagerDuty, Slack and Alertmanager, all served here by one receiver that notes each request. `--group-wait 0` is
the baseline without grouping (a page per run, then the rate limit). Writes benchmarks/results/page_storm.json
(or --name).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import serve_webhook, write_result  # noqa: E402
from common import start_up as start_up_on_kafka  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.store.api import RemoteReader, running_api  # noqa: E402
from trainwire.producers import init  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402

SINKS = {"/hook": "webhook", "/v2/enqueue": "pagerduty", "/slack": "slack", "/api/v2/alerts": "alertmanager"}


def runs_named(path: str, body) -> set[str]:
    """The runs a page names, one incident or a bundle, in each sink's own format."""
    if path == "/hook":
        return set(body.get("runs") or [body["run_id"]])
    if path == "/v2/enqueue":
        details = body.get("payload", {}).get("custom_details", {})
        return set(details.get("runs") or [body.get("payload", {}).get("source", "")])
    if path == "/api/v2/alerts":
        return {alert["labels"]["run_id"] for alert in body}
    words = (body["text"] + " " + " ".join(e["text"] for b in body["blocks"] if b["type"] == "context"
                                           for e in b["elements"])).replace(",", " ").split()
    return {w.strip(",.:()") for w in words if len(w.strip(",.:()")) == 36}


class Receiver:
    """Every sink's endpoint: notes when each request arrives and the runs it names."""

    def __init__(self):
        self.requests: list[tuple[str, float, set[str], str]] = []  # (sink, arrival, runs named, page kind)
        self.lock = threading.Lock()
        self.url = serve_webhook(self._received)

    def _received(self, path: str, body) -> None:
        kind = body.get("page", "alert") if isinstance(body, dict) else f"{len(body)} alerts"
        with self.lock:
            self.requests.append((SINKS[path], time.time(), runs_named(path, body), kind))

    def named(self) -> dict[str, set[str]]:
        with self.lock:
            named = {sink: set() for sink in SINKS.values()}
            for sink, _, runs, _ in self.requests:
                named[sink] |= runs
            return named


def start_up(home: Path, kafka: str, prefix: str, url: str, group_wait: float) -> subprocess.Popen:
    alerting = {"group_wait_seconds": group_wait, "sinks": [
        {"kind": "webhook", "url": f"{url}/hook"},
        {"kind": "pagerduty", "url": f"{url}/v2/enqueue", "routing_key": "BENCH", "severities": ["critical", "block"]},
        {"kind": "slack", "url": f"{url}/slack"},
        {"kind": "alertmanager", "url": url}]}
    return start_up_on_kafka(home, kafka, prefix, {"TRAINWIRE_ALERTING": json.dumps(alerting)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--spread-seconds", type=float, default=10.0, help="the NaNs are logged over this long")
    parser.add_argument("--group-wait", type=float, default=10.0, help="alerting.group_wait_seconds (0: no grouping)")
    parser.add_argument("--name", default="page_storm")
    args = parser.parse_args()

    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        prefix = f"storm-{uuid.uuid4().hex[:6]}."
        settings = Settings(home=home / "jobs", kafka=args.kafka, topic_prefix=prefix, heartbeat_seconds=600)
        ensure_topics(settings, [settings.topic(t) for t in ("events", "gpu", "alerts", "control", "dead-letters")])
        up = start_up(home, args.kafka, prefix, receiver.url, args.group_wait)
        try:
            runs = [init("storm", f"job-{i}", settings=settings, sample_gpus=False) for i in range(args.runs)]
            for run in runs:
                for step in (1, 2, 3):
                    run.log_step(step, loss=2.0 - step * 0.1, learning_rate=1e-4, grad_norm=1.0)
            time.sleep(3.0)  # the healthy steps are stored: what follows is the storm alone
            logged: dict[str, float] = {}
            for i, run in enumerate(runs):
                time.sleep(max(0.0, i * args.spread_seconds / args.runs - (time.time() - min(logged.values(),
                                                                                            default=time.time()))))
                logged[run.run_id] = time.time()
                run.log_step(4, loss=math.nan, learning_rate=1e-4, grad_norm=1.0)
            for run in runs:
                run.finish()
            close_all()
            every = set(logged)
            deadline = time.monotonic() + 120
            while not all(named >= every for named in receiver.named().values()) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(3.0)  # anything more would have come by now
            stored = [a for a in RemoteReader(running_api(home / "consumer"), home / "consumer").alerts()
                      if a["rule"] == "loss_not_finite" and a["run_id"] in every and a["state"] == "firing"]
        finally:
            up.terminate()
            up.wait(timeout=60)
    first_nan, last_nan = min(logged.values()), max(logged.values())
    sinks = {}
    for sink in SINKS.values():
        requests = sorted((at, runs, kind) for s, at, runs, kind in receiver.requests if s == sink)
        named: set[str] = set()
        all_named_at = None
        for at, runs, _ in requests:
            named |= runs
            if all_named_at is None and named >= every:
                all_named_at = at
        sinks[sink] = {"pages": len(requests), "runs_per_page": [len(r) for _, r, _ in requests],
                       "kinds": [k for _, _, k in requests], "runs_named": len(named & every),
                       "first_page_after_first_nan_s": round(requests[0][0] - first_nan, 3) if requests else None,
                       "every_run_named_after_last_nan_s": round(all_named_at - last_nan, 3) if all_named_at else None}
    result = {"kafka": args.kafka, "runs": args.runs, "nans_logged_over_s": round(last_nan - first_nan, 2),
              "group_wait_seconds": args.group_wait, "sinks": sinks,
              "alerts_stored": len({a["run_id"] for a in stored}),
              "path": "log_step → SDK → Kafka → trainwire up (ingest + detectors → chdb insert → alerts topic → "
                      "alert consumer → paging policy → outbox) → 4 sinks' HTTP endpoints"}
    print(json.dumps(result, indent=2))
    write_result(args.name, result)


if __name__ == "__main__":
    main()
