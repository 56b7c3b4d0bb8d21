"""Ingest benchmark: events/s from the real broker into the embedded ClickHouse, the old per-record path against
the columnar one, on a realistic fleet's messages.

    .venv/bin/python benchmarks/ingest_bench.py [--events 1000000] [--runs 1000] [--repeat 3] [--kafka 127.0.0.1:9092]
    .venv/bin/python benchmarks/ingest_bench.py --quick      # 50,000 events, once each: a smoke run of about a minute

Needs the real broker (infra/kafka/up). The fleet (fleet_mix.py: 1,000 jobs at 1 step/s with evals, 8 GPUs' samples
and heartbeats, a few NaN losses and corrupt bodies) is made once; each measurement gets the same messages on fresh
topics of 8 partitions (so a fresh consumer group) and, for `trainwire consume`, a fresh store, and runs in a process
of its own whose peak memory (VmHWM) is read from /proc. Per repeat, in this order:
  1. bare Kafka consume (confluent-kafka, no decoding): the transport's ceiling on this machine;
  2. `trainwire consume --drain` with TRAINWIRE_INGEST_PATH=records, then with columnar;
  3. two `trainwire consume` (columnar) in one consumer group, each on its own store (chdb serves one process per
     data directory), until the group has committed every message: the aggregate and each process's rate.
After each run the rows of every table are counted in the store(s) and compared with what was produced, so a fast
but wrong run is marked as such (and the bench exits 1); a consume that fails or hangs is noted with its log's tail
and the rest goes on. Rates: records over the process's wall time (start-up included; for a drain less the idle
wait that ends it), and "sustained": between the first and the last batch seen stored on the process's /metrics
endpoint (start-up — imports, chdb, migrations, joining the group — left out).
Writes benchmarks/results/ingest.json (ingest_quick.json with --quick; or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, source, write_result  # noqa: E402
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from fleet_mix import CORRUPT, FleetMix, Message, generate, kinds_of  # noqa: E402

from trainwire.consumers.service import INGEST_GROUP  # noqa: E402
from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.log.kafka_client import admin_config, client_properties, producer_config  # noqa: E402
from trainwire.infra.log.topics import EVENTS, GPU  # noqa: E402

PARTITIONS = 8
IDLE_SECONDS = 1.0  # the quiet time that ends `consume --drain`, taken off its wall time
TABLE_OF = {"step": "steps", "eval": "evals", "gpu_sample": "gpu_samples", "heartbeat": "heartbeats",
            CORRUPT: "dead_letters"}
TARGETS = {"columnar_events_per_s": 100_000, "columnar_events_per_s_stretch": 200_000, "peak_rss_mb_below": 500}


class ConsumeFailed(RuntimeError):
    """A `trainwire consume` that exited with an error: noted in the result with its log's tail, and the bench
    goes on with the other measurements (a path under construction must not hide the others' numbers)."""


class ConsumeProcess:
    """One `trainwire consume --json` under `home`, watched while it runs: its memory from /proc, and from its
    Prometheus endpoint how many records it has stored and committed, which dates its first and last batch.
    `done_at`: when its work was done (a drain: when it exited, less the idle wait that ends it)."""

    def __init__(self, command: list[str], env: dict[str, str], home: Path, idle_seconds: float):
        self.home = home
        self.port = _free_port()
        with (home / "consume.log").open("w") as log:
            self.child = subprocess.Popen([*command, "--metrics-port", str(self.port)],
                                          env={**env, "TRAINWIRE_HOME": str(home)}, stdout=subprocess.PIPE,
                                          stderr=log, text=True)
        self.started = time.perf_counter()
        self.idle_seconds = idle_seconds
        self.done_at: float | None = None
        self.exited = False
        self.peak_kb = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        self.progress: list[tuple[float, float, float]] = []  # (when, records stored and committed, CPU s), at each change

    def watch(self) -> bool:
        """One look; False once it has exited."""
        if self.exited:
            return False
        for key, kb in _memory(self.child.pid).items():
            self.peak_kb[key] = max(self.peak_kb[key], kb)
        done = _metric(self.port, "trainwire_ingest_consumed_total")
        if done and (not self.progress or done > self.progress[-1][1]):
            self.progress.append((time.perf_counter(), done, cpu_seconds(self.child.pid)))
        if self.child.poll() is not None:
            self.exited = True
            if self.done_at is None:
                self.done_at = time.perf_counter() - self.idle_seconds
        return not self.exited

    def failure(self, ingest_path: str) -> str | None:
        if self.child.returncode == 0:
            return None
        state = "still running" if self.child.returncode is None else f"exited {self.child.returncode}"
        return f"trainwire consume ({ingest_path}) {state}; its log ends: {self.log_tail()}"

    def log_tail(self) -> str:
        return (self.home / "consume.log").read_text()[-3000:]

    def result(self) -> dict:
        stats = json.loads(self.child.stdout.read())
        seconds = self.done_at - self.started
        first_at, first, last_at, last = self.span()
        cpu = self.progress[-1][2] - self.progress[0][2] if len(self.progress) > 1 else None
        return {"seconds": round(seconds, 2), "consumed": stats["consumed"],
                "events_per_s": round(stats["consumed"] / seconds),
                "sustained_events_per_s": round((last - first) / (last_at - first_at)) if last_at > first_at else None,
                # the process's CPU (all threads, chdb's included) per event over the same span: what a shared
                # machine's load does not inflate, and with the cores the ceiling of the rate (cores / CPU per event)
                "sustained_cpu_us_per_event": round(cpu / (last - first) * 1e6, 1) if cpu and last > first else None,
                "first_batch_stored_after_s": round(first_at - self.started, 2) if self.progress else None,
                "batches": stats["batches"], "peak_rss_mb": round(self.peak_kb["VmHWM"] / 1024),
                # file-backed: mostly chdb's library code, shared and reclaimable; anonymous: the process's own data
                "peak_rss_anon_mb": round(self.peak_kb["RssAnon"] / 1024),
                "peak_rss_file_mb": round(self.peak_kb["RssFile"] / 1024)}

    def span(self) -> tuple[float, float, float, float]:
        """When the first batch was seen stored and how many it held, and the same of the last: the rate between
        them leaves start-up (imports, chdb, migrations, joining the group) and the idle wait out."""
        if not self.progress:
            return 0.0, 0.0, 0.0, 0.0
        (first_at, first, _), (last_at, last, _) = self.progress[0], self.progress[-1]
        return first_at, first, last_at, last


class GroupProgress:
    """Whether the ingest group has committed every message of the events and gpu topics. Members of a group
    each drain only what they are assigned, so `--drain` side by side can end while partitions are moving between
    them; the group's commits say when all is stored."""

    def __init__(self, settings: Settings):
        self._consumer = Consumer(client_properties(settings) | {"group.id": settings.topic(INGEST_GROUP),
                                                                 "enable.auto.commit": False})
        self._partitions = [TopicPartition(settings.topic(topic), p) for topic in (EVENTS, GPU)
                            for p in range(PARTITIONS)]
        # nothing else writes these topics once produced, so their ends are fixed
        self._ends = {(tp.topic, tp.partition): self._consumer.get_watermark_offsets(tp, timeout=10)[1]
                      for tp in self._partitions}

    def caught_up(self) -> bool:
        try:
            committed = self._consumer.committed(self._partitions, timeout=2)
        except KafkaException:
            return False
        return all(self._ends[(tp.topic, tp.partition)] in (0, tp.offset) for tp in committed)

    def close(self) -> None:
        self._consumer.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5).read().decode()
    except OSError:  # not serving yet, or gone
        return None
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def in_fresh_process(function, *args):
    """`function(*args)` in a spawned process of its own: its memory is its own, and chdb (one data directory per
    process) is loaded anew."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


@contextmanager
def fresh_topics(kafka: str, messages: list[Message], produced: list[float]):
    """Settings under a new topic prefix (so new topics and a new consumer group) whose events and gpu topics
    hold `messages`; the prefix's topics are deleted after, so repeats do not fill the broker's disk."""
    settings = Settings(kafka=kafka, topic_prefix=f"ingest-bench-{uuid.uuid4().hex[:8]}.")
    ensure_topics(settings, [settings.topic(EVENTS), settings.topic(GPU)], partitions=PARTITIONS)
    produced.append(produce(settings, messages))
    try:
        yield settings
    finally:
        admin = AdminClient(admin_config(settings))
        mine = [t for t in admin.list_topics(timeout=30).topics if t.startswith(settings.topic_prefix)]
        for future in admin.delete_topics(mine, operation_timeout=30).values():
            future.result()


def produce(settings: Settings, messages: list[Message]) -> float:
    """Keyed by run id with the SDK's producer settings (same partitioner), as jobs would send them."""
    producer = Producer(producer_config(settings))
    topics = {EVENTS: settings.topic(EVENTS), GPU: settings.topic(GPU)}
    started = time.perf_counter()
    for message in messages:
        while True:
            try:
                producer.produce(topics[message.topic], value=message.value, key=message.key)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    if producer.flush(300) != 0:
        raise SystemExit("the broker did not take every message")
    return len(messages) / (time.perf_counter() - started)


def bare_consume(settings: Settings, expected: int) -> dict:
    """Run in a process of its own: read every message of both topics, decoding nothing."""
    consumer = Consumer(client_properties(settings) | {"group.id": f"bare-{uuid.uuid4().hex[:8]}",
                                                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topic(EVENTS), settings.topic(GPU)])
    seen, started = 0, None
    while seen < expected:
        batch = consumer.consume(10_000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
        seen += sum(1 for m in batch if m.error() is None)
    rate = expected / (time.perf_counter() - started)
    consumer.close()
    return {"events_per_s": round(rate), "peak_rss_mb": round(_memory(os.getpid())["VmHWM"] / 1024)}


def consume(settings: Settings, ingest_path: str, homes: list[Path], batch: dict[str, str],
            expected: int) -> list[ConsumeProcess]:
    """`trainwire consume`, one process per home, all in the topics' consumer group: one alone with `--drain`; more
    than one run until the group has committed everything, then are stopped with SIGTERM (they store and commit
    what they hold, leave the group and exit). One that exits with an error, or is not done at a pace of 2,000
    records/s plus two minutes, fails the run (and is killed).

    Not getrusage(RUSAGE_CHILDREN) for memory: Linux counts a child's pages from before its exec, i.e. this
    process's own (the messages) at the fork."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_KAFKA": settings.kafka, "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix,
           "TRAINWIRE_INGEST_PATH": ingest_path, **batch}
    group = GroupProgress(settings) if len(homes) > 1 else None
    drain = [] if group else ["--drain", "--idle-seconds", str(IDLE_SECONDS)]
    deadline = time.perf_counter() + 120 + expected / 2_000
    # side by side under different homes they would take the same default id (one slot each) and fence each other
    processes = [ConsumeProcess([sys.executable, "-m", "trainwire", "consume", *drain, "--json", "--instance-id",
                                 f"ingest-bench-{n}"], env, home, IDLE_SECONDS if drain else 0.0)
                 for n, home in enumerate(homes)]
    try:
        while any([p.watch() for p in processes]):
            if any(p.child.returncode not in (None, 0) for p in processes):
                break  # one failed: the rest cannot finish the run
            if group and processes[0].done_at is None and group.caught_up():
                for p in processes:
                    p.done_at = time.perf_counter()
                    p.child.terminate()
            if time.perf_counter() > deadline:
                raise ConsumeFailed(f"not done after {time.perf_counter() - processes[0].started:.0f} s:\n"
                                    + "\n".join(p.failure(ingest_path) or "" for p in processes))
            time.sleep(0.1)
        if failures := [f for p in processes if (f := p.failure(ingest_path))]:
            raise ConsumeFailed("\n".join(failures))
        return processes
    finally:
        if group:
            group.close()
        for p in processes:
            if p.child.poll() is None:
                p.child.kill()
                p.child.wait()


def _memory(pid: int) -> dict[str, int]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just exited
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
            if line.split(":")[0] in ("VmHWM", "RssAnon", "RssFile")}


def stored_counts(home: Path) -> dict[str, int]:
    """Run in a process of its own: the rows of each table the fleet's messages land in, and of alerts."""
    from trainwire.infra.store import connect_store

    client = connect_store(f"chdb://{home / 'chdb'}")
    try:
        return {table: client.command(f"SELECT count() FROM {table}")
                for table in [*TABLE_OF.values(), "alerts"]}
    finally:
        client.close()


def checked(homes: list[Path], expected: dict[str, int], nans: int) -> dict:
    """Rows stored (summed over the stores) against the messages produced: every one once, a dead letter per
    corrupt body, and the NaN losses paged (at least one alert each)."""
    counts = [in_fresh_process(stored_counts, home) for home in homes]
    stored = {table: sum(c[table] for c in counts) for table in counts[0]}
    wanted = {TABLE_OF[kind]: n for kind, n in expected.items()}
    ok = all(stored[table] == n for table, n in wanted.items()) and stored["alerts"] >= nans
    return {"counts_ok": ok, "stored": stored, **({} if ok else {"expected": wanted, "alerts_at_least": nans})}


def one_path(settings: Settings, ingest_path: str, expected: dict[str, int], nans: int,
             batch: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            process, = consume(settings, ingest_path, [Path(tmp)], batch, sum(expected.values()))
        except ConsumeFailed as err:
            return {"counts_ok": False, "error": str(err)}
        return {**process.result(), **checked([Path(tmp)], expected, nans)}


def two_consumers(settings: Settings, expected: dict[str, int], nans: int, batch: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        homes = [Path(a), Path(b)]
        try:
            processes = consume(settings, "columnar", homes, batch, sum(expected.values()))
        except ConsumeFailed as err:
            return {"counts_ok": False, "error": str(err)}
        each = [p.result() for p in processes]
        total = sum(e["consumed"] for e in each)
        seconds = max(e["seconds"] for e in each)
        spans = [p.span() for p in processes if p.progress]
        first_at, last_at = min(s[0] for s in spans), max(s[2] for s in spans)
        sustained = sum(s[3] - s[1] for s in spans) / (last_at - first_at) if last_at > first_at else None
        return {"aggregate_events_per_s": round(total / seconds), "seconds": seconds,
                "aggregate_sustained_events_per_s": None if sustained is None else round(sustained),
                "processes": each, **checked(homes, expected, nans)}


def summarise_path(drains: list[dict]) -> dict:
    """Medians over the drains that ran; counts are all right only if every drain ran and stored what it read."""
    ran = [d for d in drains if "error" not in d]
    return {"median_events_per_s": _median(d["events_per_s"] for d in ran),
            "median_sustained_events_per_s": _median(d["sustained_events_per_s"] for d in ran),
            "median_sustained_cpu_us_per_event": _median(d["sustained_cpu_us_per_event"] for d in ran),
            "median_first_batch_stored_after_s": _median(d["first_batch_stored_after_s"] for d in ran),
            "max_peak_rss_mb": max((d["peak_rss_mb"] for d in ran), default=None),
            "all_counts_ok": all(d["counts_ok"] for d in drains), "drains": drains}


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def verdict(columnar: dict) -> dict:
    sustained, peak = columnar["median_sustained_events_per_s"], columnar["max_peak_rss_mb"]
    ok = columnar["all_counts_ok"] and sustained is not None
    return {"columnar_events_per_s": {"target": TARGETS["columnar_events_per_s"],
                                      "stretch": TARGETS["columnar_events_per_s_stretch"],
                                      "measured_sustained": sustained,
                                      "measured_with_startup": columnar["median_events_per_s"],
                                      "met": ok and sustained >= TARGETS["columnar_events_per_s"],
                                      "stretch_met": ok and sustained >= TARGETS["columnar_events_per_s_stretch"]},
            "peak_rss_mb": {"target_below": TARGETS["peak_rss_mb_below"], "measured_max": peak,
                            "met": ok and peak < TARGETS["peak_rss_mb_below"]},
            "judged_on": "the columnar path's median sustained rate (start-up left out) and its largest peak RSS; "
                         "a run that failed or whose stored counts differ from what was produced meets nothing"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=1_000_000, help="about this many messages (sizes the window)")
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--steps-per-s", type=float, default=1.0, help="per job")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are quoted")
    parser.add_argument("--batch-max-rows", type=int, default=Settings.model_fields["batch_max_rows"].default)
    parser.add_argument("--batch-max-seconds", type=float,
                        default=Settings.model_fields["batch_max_seconds"].default)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50,000 events, once each")
    parser.add_argument("--name", help="result file name (default ingest, or ingest_quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.events, args.repeat = 50_000, 1
    name = args.name or ("ingest_quick" if args.quick else "ingest")
    batch = {"TRAINWIRE_BATCH_MAX_ROWS": str(args.batch_max_rows),
             "TRAINWIRE_BATCH_MAX_SECONDS": str(args.batch_max_seconds)}

    began, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)

    def say(line: str) -> None:
        print(f"{time.perf_counter() - began:6.0f}s  {line}", file=sys.stderr, flush=True)

    mix = FleetMix.for_events(args.events, runs=args.runs, steps_per_s=args.steps_per_s)
    say(f"making the fleet's messages ({mix.seconds:.0f} s of {mix.runs} jobs) …")
    messages = generate(mix, time.time_ns() // 1_000_000, workers=os.cpu_count() or 1)
    made_in = time.perf_counter() - began
    kinds = kinds_of(messages)
    say(f"{len(messages)} messages: {kinds}")

    produced: list[float] = []
    bare, paths, pairs = [], {"records": [], "columnar": []}, []
    for attempt in range(1, args.repeat + 1):
        with fresh_topics(args.kafka, messages, produced) as settings:
            say(f"[{attempt}/{args.repeat}] bare consume …")
            bare.append(in_fresh_process(bare_consume, settings, len(messages)))
            say(f"[{attempt}/{args.repeat}] records: trainwire consume …")
            paths["records"].append(one_path(settings, "records", kinds, mix.nan_losses, batch))
        with fresh_topics(args.kafka, messages, produced) as settings:
            say(f"[{attempt}/{args.repeat}] columnar: trainwire consume …")
            paths["columnar"].append(one_path(settings, "columnar", kinds, mix.nan_losses, batch))
        with fresh_topics(args.kafka, messages, produced) as settings:
            say(f"[{attempt}/{args.repeat}] columnar: two trainwire consume in one group …")
            pairs.append(two_consumers(settings, kinds, mix.nan_losses, batch))
        say(f"[{attempt}/{args.repeat}] events/s: bare {bare[-1]['events_per_s']}, records "
            f"{_rate(paths['records'][-1], 'events_per_s')}, columnar {_rate(paths['columnar'][-1], 'events_per_s')}, "
            f"two consumers {_rate(pairs[-1], 'aggregate_events_per_s')}")
    summaries = {path: summarise_path(drains) for path, drains in paths.items()}

    result = {
        "kafka": args.kafka, "quick": args.quick, "source": source(), "repeat": args.repeat,
        "mix": {**mix.describe(), "messages": len(messages), "by_kind": kinds,
                "made_in_seconds": round(made_in, 1)},
        "consume_settings": {"partitions": PARTITIONS, "batch_max_rows": args.batch_max_rows,
                             "batch_max_seconds": args.batch_max_seconds, "drain_idle_seconds": IDLE_SECONDS},
        "produce_events_per_s": round(statistics.median(produced)),
        "bare_consume": {"median_events_per_s": statistics.median(b["events_per_s"] for b in bare), "runs": bare},
        **summaries,
        "two_consumers_columnar": {
            "median_aggregate_events_per_s": _median(p.get("aggregate_events_per_s") for p in pairs),
            "median_aggregate_sustained_events_per_s": _median(p.get("aggregate_sustained_events_per_s")
                                                               for p in pairs),
            "median_per_process_events_per_s": _median(q["events_per_s"] for p in pairs
                                                       for q in p.get("processes", [])),
            "all_counts_ok": all(p["counts_ok"] for p in pairs), "runs": pairs},
        "targets": verdict(summaries["columnar"]),
        "bench_seconds": round(time.perf_counter() - began),
        "load_average_1min": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
    }
    path = write_result(name, result)
    print(path.read_text())
    say(f"done: {path}")
    wrong = [what for what, ok in (("records", summaries["records"]["all_counts_ok"]),
                                   ("columnar", summaries["columnar"]["all_counts_ok"]),
                                   ("two consumers", result["two_consumers_columnar"]["all_counts_ok"])) if not ok]
    if wrong:
        raise SystemExit(f"failed, or stored counts differ from what was produced: {', '.join(wrong)} (see {path})")


def _rate(run: dict, key: str) -> str:
    return str(run[key]) if key in run else "failed"


if __name__ == "__main__":
    main()
