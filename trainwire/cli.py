"""The `trainwire` command. Human-readable output by default, one JSON object with `--json`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from trainwire.cli_errors import (EXIT_FAILED, EXIT_INTERRUPTED, TRACEBACK_VARIABLE, Failure, check_arguments, check_home,
                                  describe_failure, needs_kafka_check, quiet_libraries, report, terminal_safe,
                                  unexpected)
from trainwire.cli_export import add_export_command
from trainwire.cli_output import Column, cell, column, stage_value, table
from trainwire.cli_runs import RUN_HELP, reports_run_lookup
from trainwire.infra.config import ConfigError, Settings, load_settings

EXIT_TRANSPORT_UNAVAILABLE = 5  # after 2 (bad configuration), 3 (dead-letter limit), 4 (fenced consumer)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(kafka=getattr(args, "kafka", None), store=getattr(args, "store", None),
                             dashboard_host=getattr(args, "host", None),
                             metrics_host=getattr(args, "metrics_host", None))
    check_home(settings.home)
    return settings


def _check_transport(settings: Settings) -> None:
    """Before a long-running command starts anything: Kafka answers and accepts these credentials (exit 5 if not)."""
    from trainwire.infra.log import check_transport

    check_transport(settings)


def _emit(args: argparse.Namespace, payload: Any, human: str) -> None:
    from trainwire.cli_output import json_text

    print(json_text(payload) if args.json else terminal_safe(human))


def cmd_demo(args: argparse.Namespace) -> int:
    from trainwire.demo import parse_faults, run_demo

    faults = parse_faults(args.inject)
    if args.jobs < 1 or args.steps < 1:
        raise ValueError("--jobs and --steps must be at least 1")
    step_seconds = args.step_seconds if args.step_seconds is not None else (0.005 if args.headless else 0.25)
    report = run_demo(_settings(args), jobs=args.jobs, steps=args.steps, faults=faults, headless=args.headless,
                      step_seconds=step_seconds, port=args.port)
    lines = [
        f"events produced {report.events_produced}, stored {report.events_stored} "
        f"({'all stored' if report.complete else 'INCOMPLETE'}) in {report.seconds}s",
        f"transport {report.transport}", f"store {report.store}", f"runs: {len(report.runs)}",
    ]
    lines += [f"  alert {a['severity']:<8} {a['rule']:<16} run {a['run_id']} step {a['step']} ({a['state']})"
              for a in report.alerts] or ["  no alerts"]
    _emit(args, {**report.__dict__}, "\n".join(lines))
    return 0 if report.complete else 1


def cmd_consume(args: argparse.Namespace) -> int:
    from trainwire.consumers.admission import DeadLetterLimitError
    from trainwire.consumers.service import build_ingest, run_ingest, tune_gc_for_ingest
    from trainwire.infra.log.base import FatalTransportError

    settings = _settings(args)
    _check_transport(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # store and commit what is held, leave the group, exit
        signal.signal(sig, lambda *_: stop.set())
    pipeline = build_ingest(settings, instance_id=args.instance_id)
    tune_gc_for_ingest()
    if args.metrics_port:
        from trainwire.up import serve_metrics

        serve_metrics(pipeline, settings, args.metrics_port)
    caught_up = True
    try:
        if args.drain:
            try:
                caught_up = pipeline.drain(idle_seconds=args.idle_seconds, stop=stop)
            finally:
                pipeline.close()
        else:
            print("consuming; Ctrl-C or SIGTERM to stop", file=sys.stderr)
            run_ingest(pipeline, stop)
    except DeadLetterLimitError as err:  # the uncommitted records wait in the transport for the fix
        print(f"trainwire: ingest stopped: {err}", file=sys.stderr)
        return 3
    except FatalTransportError as err:
        print(f"trainwire: ingest stopped: {err}", file=sys.stderr)
        return 4
    stats = pipeline.stats.__dict__
    _emit(args, stats, ", ".join(f"{k} {v}" for k, v in stats.items()))
    if not caught_up:
        print("trainwire: stopped before catching up: records may still be pending", file=sys.stderr)
        return 1
    return 0


@reports_run_lookup
def cmd_alerts(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action in _SILENCE_ACTIONS:
        return _alerts_silences(args, settings)
    if args.silence_id is not None:
        raise ValueError(f"alerts {args.action} takes no {args.silence_id!r} (only `alerts unsilence ID` does)")
    if args.action == "status":
        return _alerts_status(args, settings)
    if args.action == "test":
        return _alerts_test(args, settings)
    from trainwire.consumers.alerting.service import build_alerting, run_alerting
    from trainwire.infra.store.api import running_api

    if settings.embedded_store and running_api(settings.home):
        raise ValueError("on the embedded defaults `trainwire up` runs the alert consumer itself; "
                         "`trainwire alerts status` shows what it delivered")
    _check_transport(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    consumer = build_alerting(settings)
    print(f"paging through {', '.join(s.name for s in consumer.sinks)}", file=sys.stderr)
    settled = True
    if args.drain:
        try:
            settled = consumer.drain(args.idle_seconds, stop)
        finally:
            consumer.close()
    else:
        print("consuming alerts; Ctrl-C or SIGTERM to stop", file=sys.stderr)
        run_alerting(consumer, stop)
    result = {"read": consumer.read, "deliveries_enqueued": consumer.enqueued, "undecodable": consumer.undecodable,
              "sinks": consumer.dispatcher.counts()}
    _emit(args, result, f"read {consumer.read} alerts, {consumer.enqueued} new deliveries; " + ", ".join(
        f"{name}: {c['delivered']} delivered, {c['failed']} failed" for name, c in result["sinks"].items()))
    return 0 if settled else 1


SINK_COLUMNS = (column("Sink"), column("Pending", right=True), column("Delivered", right=True),
                column("Failed", right=True), column("Silenced", right=True), column("Suppressed", right=True),
                column("Oldest pending (s)", "oldest_pending_seconds", right=True), column("Last error"))
FAILURE_COLUMNS = (column("Sink"), column("Dedup key"), column("State"), column("Attempts", right=True),
                   column("Error"))


def _alerts_status(args: argparse.Namespace, settings: Settings) -> int:
    from trainwire.consumers.alerting.outbox import Outbox
    from trainwire.consumers.alerting.service import outbox_path

    path = outbox_path(settings)
    if not path.exists():
        _emit(args, {"outbox": str(path), "sinks": [], "failures": []}, f"no alert delivered yet ({path})")
        return 0
    outbox = Outbox(path)
    try:
        result = {"outbox": str(path), "sinks": outbox.summary(), "failures": outbox.failures()}
    finally:
        outbox.close()
    human = table(result["sinks"], SINK_COLUMNS, "no alert delivered yet")
    if result["failures"]:
        human += "\n\nfailed pages:\n" + table(result["failures"], FAILURE_COLUMNS, "")
    _emit(args, result, human)
    return 1 if any(r["failed"] for r in result["sinks"]) else 0


def _alerts_test(args: argparse.Namespace, settings: Settings) -> int:
    """Send one made-up alert straight to each configured sink (not through Kafka), to check the wiring."""
    import uuid

    from trainwire.consumers.alerting.sinks import SinkError, build_sinks
    from trainwire.schemas import Alert

    alert = Alert(run_id="trainwire-test", experiment="trainwire-test", team=settings.team, rule="test_page",
                  severity=args.severity, state="firing", message="a test page from `trainwire alerts test`",
                  dedup_key=f"trainwire-test/{uuid.uuid4()}")
    results = []
    for sink in build_sinks(settings.alerting):
        if not sink.accepts(alert):
            results.append({"sink": sink.name, "result": f"not routed ({args.severity} is not in its route)"})
            continue
        try:
            sink.deliver(alert)
            results.append({"sink": sink.name, "result": "delivered"})
        except SinkError as err:
            results.append({"sink": sink.name, "result": f"FAILED: {err}"})
    _emit(args, results, "\n".join(f"{r['sink']:<16} {r['result']}" for r in results))
    return 1 if any(r["result"].startswith("FAILED") for r in results) else 0


_SILENCE_ACTIONS = ("silence", "silences", "unsilence")
_SILENCE_MATCHERS = {"run": "run_id", "experiment": "experiment", "rule": "rule", "host": "host"}


def _duration(value: str) -> float:
    if not (match := re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", value.strip())):
        raise ValueError(f"--for {value!r}: expected a duration such as 30s, 15m, 2h, 1d or 1w")
    return float(match[1]) * _SECONDS_PER[match[2]]


def _silence_call(settings: Settings, action: str, **arguments: Any) -> Any:
    """A silence operation where the store is: the `trainwire up` that owns the embedded store, over its API (as
    `registry` writes), or the store opened here. Either way each change is in the audit log."""
    from trainwire.infra.store.api import RemoteReader, running_api, to_json

    if settings.embedded_store and (url := running_api(settings.home)):
        return RemoteReader(url, settings.home).act(action, **arguments)
    from trainwire.infra.store import connect_store, migrate
    from trainwire.infra.store.silences import SilenceBook

    client = connect_store(settings.store_dsn)
    try:
        migrate(client, cluster=settings.store_cluster)  # a store from before migration 008 gets its silences table
        return to_json(getattr(SilenceBook(client), action)(**arguments))
    finally:
        client.close()


SILENCE_COLUMNS = (column("Id", "silence_id"), column("Status"), column("Matchers"),
                   Column("Ends", lambda s: s["removed_at"] or s["ends_at"]), column("By", "created_by"),
                   column("Reason"))


def _alerts_silences(args: argparse.Namespace, settings: Settings) -> int:
    """`alerts silence` (matchers, --for/--until, --reason), `alerts silences [--all]`, `alerts unsilence ID`."""
    matchers = {field: getattr(args, name) or "" for name, field in _SILENCE_MATCHERS.items()}
    if args.action != "silence" and (any(matchers.values()) or args.for_ or args.until):
        raise ValueError(f"alerts {args.action} takes no matchers, --for or --until (those are for `alerts silence`)")
    if args.action != "unsilence" and args.silence_id is not None:
        raise ValueError(f"alerts {args.action} takes no {args.silence_id!r} (`alerts unsilence ID` does)")
    try:
        if args.action == "silence":
            if not any(matchers.values()):
                raise ValueError("alerts silence needs at least one of --run, --experiment, --rule, --host")
            if (args.for_ is None) == (args.until is None):
                raise ValueError("alerts silence needs --for DURATION (e.g. 2h) or --until TIME, one of them")
            if not (args.reason or "").strip():
                raise ValueError("alerts silence needs --reason TEXT: why these pages may wait")
            for_seconds = None if args.for_ is None else _duration(args.for_)  # refused before the store is read
            if matchers["run_id"]:
                from trainwire.cli_runs import resolve_run

                matchers["run_id"] = resolve_run(settings, matchers["run_id"])
            created = _silence_call(settings, "create_silence", actor=_actor(args), reason=args.reason,
                                    for_seconds=for_seconds, until=args.until, **matchers)
            _emit(args, created, f"silenced {created['matchers']} until {created['ends_at']} as "
                                 f"{created['silence_id']} (`trainwire alerts unsilence {created['silence_id']}` "
                                 "ends it sooner)")
            return 0
        if args.action == "unsilence":
            if args.silence_id is None:
                raise ValueError("alerts unsilence needs the silence's ID (`trainwire alerts silences` lists them)")
            removed = _silence_call(settings, "remove_silence", silence_id=args.silence_id, actor=_actor(args),
                                    reason=args.reason or "")
            _emit(args, removed, f"silence {removed['silence_id']} ({removed['matchers']}) removed by "
                                 f"{removed['removed_by']}")
            return 0
        silences = _silence_call(settings, "list_silences", include_ended=args.all)
    except RuntimeError as err:  # `up`'s API or the store failed: one line (JSON under --json), no traceback
        return report(args, Failure(str(err), EXIT_FAILED))
    empty = "no silences" if args.all else "no active silences (--all lists ended ones too)"
    _emit(args, silences, table(silences, SILENCE_COLUMNS, empty))
    return 0


RUN_COLUMNS = (column("Run id", "run_id"), column("Experiment"), column("Name", "run_name"), column("Status"),
               column("Started", "started_at"), column("Step", "last_step", right=True),
               column("Final loss", right=True), column("Firing", "firing_alerts", right=True))
GATE_COLUMNS = (column("Gate"), column("Name"), column("On fail"), column("Status"), column("Message"))


def cmd_runs(args: argparse.Namespace) -> int:
    from trainwire.cli_runs import open_reader, stored_runs

    with open_reader(_settings(args)) as reader:
        runs = stored_runs(reader)
    _emit(args, runs, table(runs, RUN_COLUMNS, "no runs stored"))
    return 0


@reports_run_lookup
def cmd_run(args: argparse.Namespace) -> int:
    """One run: its summary, its open (firing) alerts and its latest gate result."""
    from trainwire.cli_output import key_values
    from trainwire.cli_runs import match_run, open_reader, stored_runs

    with open_reader(_settings(args)) as reader:
        run_id = match_run(stored_runs(reader), args.run_id)
        summary = reader.run_summary(run_id=run_id)
        alerts = reader.alert_incidents(run_ids=[run_id], states=["firing"])
        latest = reader.latest_gates(run_id=run_id)
    gates = None if latest is None else {
        "overall": latest["overall"], "evaluated_at": latest["evaluated_at"], "trigger": latest["trigger"],
        "baseline": latest["baseline"] or None,
        "gates": [{k: g[k] for k in ("gate", "name", "on_fail", "status", "message")} for g in latest["gates"]]}
    open_alerts = [{k: a[k] for k in ("rule", "severity", "step", "fired_at", "message")} for a in alerts]
    human = [key_values(list(summary.items())), "", "open alerts:",
             table(open_alerts, (column("Severity"), column("Rule"), column("Step", right=True),
                                 column("Fired", "fired_at"), column("Message")), "  none firing")]
    if gates is None:
        human += ["", f"gates: not evaluated yet (`trainwire gates {run_id[:8]}`)"]
    else:
        human += ["", f"gates: {gates['overall'].upper()} "
                      f"(evaluated {cell(gates['evaluated_at'])} UTC, {gates['trigger']})",
                  table(gates["gates"], GATE_COLUMNS, "")]
    _emit(args, {**summary, "open_alerts": open_alerts, "gates": gates}, "\n".join(human))
    return 0


_ACTOR_DEFAULT = "default: the OS user; naming someone else needs act_for_others in the roles file"


def _os_user() -> str:
    """The login of this process's real user: $USER and $LOGNAME are anyone's to set, the uid is not."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without an account (some containers)
        return f"uid {os.getuid()}"


def _actor(args: argparse.Namespace, settings: Settings | None = None) -> str:
    """Who acts: the OS user, or `--actor NAME` when the roles file lists the OS user in `act_for_others`. Checked
    (and a refusal logged) where the store is, as every governance operation is."""
    from trainwire.consumers.governance.registry import normalise_actor

    os_user = normalise_actor(_os_user())
    with contextlib.suppress(ValueError):  # an actor that does not normalise is refused (and logged) below
        if args.actor is None or normalise_actor(args.actor) == os_user:
            return os_user
    return _govern(settings or _settings(args), "act_as", actor=args.actor)["actor"]


def _govern(settings: Settings, action: str, **arguments: Any) -> Any:
    """A governance operation (gates, audit, registry), run where the store is: in this process, or in the
    `trainwire up` that owns the embedded store, over its API. Either way it is logged in the audit log, and the
    OS user asking goes with it: the roles file there decides whom they may act as."""
    from trainwire.infra.store.api import RemoteReader, running_api, to_json

    arguments["os_user"] = _os_user()
    if settings.embedded_store and (url := running_api(settings.home)):
        return RemoteReader(url, settings.home).act(action, **arguments)
    from trainwire.consumers.governance import Governance, roles_for
    from trainwire.infra.store import connect_store, migrate

    client = connect_store(settings.store_dsn)
    try:
        migrate(client)
        return to_json(Governance(client, roles_for(settings)).actions()[action](**arguments))
    finally:
        client.close()


EXIT_GATES_NOT_EVALUATED = 8  # gates' own 2 means blocked: its other errors must not read as an outcome


@reports_run_lookup
def cmd_gates(args: argparse.Namespace) -> int:
    """Exit 0/1/2 for passed/warnings/blocked only; a run that is not there (6), ambiguous (7) or any other reason
    the gates could not be evaluated (8) is never mistaken for an outcome by a pipeline reading the exit code."""
    try:
        return _evaluate_gates(args)
    except (ConfigError, ValueError, RuntimeError) as err:
        if args.json:
            print(json.dumps({"error": str(err), "exit_code": EXIT_GATES_NOT_EVALUATED}))
        else:
            print(f"trainwire: error: {err}", file=sys.stderr)
        return EXIT_GATES_NOT_EVALUATED


def _gates_usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """`trainwire gates` with bad arguments exits 8, not argparse's 2, which `gates` means as "blocked"."""
    parser.print_usage(sys.stderr)
    parser.exit(EXIT_GATES_NOT_EVALUATED, f"{parser.prog}: error: {message}\n")


def _evaluate_gates(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainwire.cli_runs import RunLookupError, resolve_run
    from trainwire.consumers.governance import baseline_from_file
    from trainwire.consumers.governance.gates import metric_direction

    if args.metric:
        metric_direction(args.metric)  # an unknown metric direction stops here, before anything is recorded
    baseline: dict[str, Any] = {}
    if args.baseline and Path(args.baseline).is_file():  # a bad file stops here too
        baseline = {"baseline_metrics": baseline_from_file(Path(args.baseline)), "baseline_label": args.baseline}
    settings = _settings(args)
    run_id = resolve_run(settings, args.run_id)
    if args.baseline and not baseline:
        try:
            baseline = {"baseline_run": resolve_run(settings, args.baseline)}
        except RunLookupError as err:
            raise RunLookupError(f"--baseline: {err}", err.exit_code, err.candidates) from None
    result = _govern(settings, "evaluate_gates", run_id=run_id, actor=_actor(args, settings), metric=args.metric,
                     **baseline)
    result["stage"] = stage_value(result["stage"])
    heading = (f"run {result['run_id']}: {result['overall'].upper()}  (stage {result['stage'] or 'none yet'}, "
               f"baseline {result['baseline'] or 'none'})")
    _emit(args, result, heading + "\n" + table(result["gates"], GATE_COLUMNS, ""))
    return result["exit_code"]


@reports_run_lookup
def cmd_registry(args: argparse.Namespace) -> int:
    from trainwire.cli_runs import resolve_run

    settings, actor = _settings(args), _actor(args)
    run_id = None if args.run_id is None else resolve_run(settings, args.run_id)
    if args.action == "status":
        result = _govern(settings, "registry_status", actor=actor, run_id=run_id)
        if run_id is None:
            human = table(result["runs"], (column("Run id", "run_id"), column("Stage"), column("Since"),
                                           column("By", "actor")), "no run is in the registry yet")
        else:
            for transition in (*result["history"], *result["unvouched"]):
                transition["from"] = stage_value(transition["from"])
            result["stage"] = stage_value(result["stage"])
            human = "\n".join([f"run {result['run_id']}: stage {result['stage'] or 'none yet'} "
                               f"(gates {result['gates'] or 'not evaluated'})"] + [
                f"  {cell(h['at'])}  {h['from'] or 'none':>10} → {h['to']:<10} by {h['actor']}: {h['reason']}"
                for h in result["history"]] + [
                f"  ignored: entry {u['seq']} ({u['from'] or 'none'} → {u['to']} by {u['actor']}) is {u['problem']}; "
                "run `trainwire audit verify`" for u in result["unvouched"]])
        _emit(args, result, human)
        return 0
    if run_id is None:
        raise ValueError(f"registry {args.action} needs a RUN")
    result = _govern(settings, f"registry_{args.action}", run_id=run_id, actor=actor, reason=args.reason)
    result["from"] = stage_value(result["from"])
    _emit(args, result, f"run {result['run_id']}: {result['from'] or 'none'} → {result['stage']} "
                        f"by {result['actor']}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from trainwire.up import up_embedded, up_services

    settings = _settings(args)
    _check_transport(settings)
    if settings.embedded_store:
        up_embedded(settings, args.port, dashboard=not args.no_dashboard, metrics_port=args.metrics_port)
        return 0
    return up_services(settings, args.port, dashboard=not args.no_dashboard, metrics_port=args.metrics_port)


def cmd_spool_replay(args: argparse.Namespace) -> int:
    from trainwire.infra.log.spool import SpoolingProducer

    settings = _settings(args)
    if not settings.kafka:
        raise ValueError("spool replay sends spooled events to Kafka: set TRAINWIRE_KAFKA or --kafka")
    _check_transport(settings)
    producer = SpoolingProducer(settings, settings.spool_dir)
    total = producer.undelivered()
    print(f"replaying {total} spooled events from {producer.adopted} spool(s) in {settings.spool_dir}",
          file=sys.stderr)
    remaining = producer.flush(args.timeout)
    producer.close()
    result = {"spools": producer.adopted, "events": total, "sent": producer.sent, "rejected": producer.rejected,
              "remaining": remaining}
    _emit(args, result, f"sent {producer.sent} of {total} spooled events"
                        + (f"; {remaining} still spooled (broker unreachable?)" if remaining else ""))
    return 0 if remaining == 0 else 1


_SECONDS_PER = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _since(value: str | None) -> datetime | None:
    """--since: a duration back from now (90s, 15m, 2h, 7d, 1w) or an ISO 8601 time (UTC unless it names a zone)."""
    if value is None:
        return None
    if (match := re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", value.strip())):
        return datetime.now(timezone.utc) - timedelta(seconds=float(match[1]) * _SECONDS_PER[match[2]])
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"--since {value!r}: expected a duration back from now (30s, 15m, 2h, 7d, 1w) "
                         "or an ISO 8601 time such as 2025-06-01T12:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


_REPLAYS_PER_REQUEST = 5_000  # (topic, partition, offset) each: well under the read API's 1 MiB body


@contextlib.contextmanager
def _dead_letter_store(settings: Settings) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """(reader, record replays) where the store is: the running `trainwire up` that owns the embedded store, over
    its API (as `runs` reads and `registry` writes), or the store opened here."""
    from trainwire.infra.store.api import RemoteReader, running_api

    if settings.embedded_store and (url := running_api(settings.home)):
        remote = RemoteReader(url, settings.home)

        def record(letters: list[dict[str, Any]], replayed_by: str) -> int:  # in parts: the API bounds a body
            return sum(remote.act("record_dead_letter_replays", letters=letters[i:i + _REPLAYS_PER_REQUEST],
                                  replayed_by=replayed_by) for i in range(0, len(letters), _REPLAYS_PER_REQUEST))

        yield remote, record
        return
    from trainwire.infra.store import connect_store, migrate
    from trainwire.infra.store.read import StoreReader

    client = connect_store(settings.store_dsn)
    try:
        migrate(client, cluster=settings.store_cluster)  # a store from before migration 006 gets its replays table
        reader = StoreReader(client)
        yield reader, reader.record_dead_letter_replays
    finally:
        client.close()


DEAD_LETTER_COLUMNS = (column("Time (UTC)", "ts"), column("Topic"), column("Partition", right=True),
                       column("Offset", right=True),
                       Column("Reason", lambda d: d["reason"] if len(d["reason"]) <= 160 else d["reason"][:159] + "…"),
                       Column("Replayed", lambda d: d["replayed_at"] and f"{cell(d['replayed_at'])} by "
                                                                         f"{d['replayed_by']}"))


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from trainwire.infra.store.api import to_json

    settings = _settings(args)
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be 0 (all) or more")
    filters = {"since": _since(args.since), "topic": args.topic, "reason_contains": args.reason_contains}
    actor = _actor(args, settings) if args.action == "replay" else None  # refused before anything is replayed
    try:
        with _dead_letter_store(settings) as (reader, record):
            if args.action == "list":
                limit = args.limit or None
                letters = to_json(reader.list_dead_letters(**filters, limit=limit and limit + 1))
                return _list_dead_letters(args, letters, limit)
            letters = to_json(reader.list_dead_letters(**filters))
            return _replay_dead_letters(args, settings, letters, lambda done: record(done, actor))
    except RuntimeError as err:  # the transport, a schema registry or `up`'s API failed: one line, no traceback
        return report(args, Failure(str(err), EXIT_FAILED))


def _list_dead_letters(args: argparse.Namespace, letters: list[dict[str, Any]], limit: int | None) -> int:
    more = limit is not None and len(letters) > limit
    letters = letters[:limit]
    human = table(letters, DEAD_LETTER_COLUMNS, "no dead letters")
    if more:
        human += f"\n(the newest {limit}; --limit N for more, 0 for all)"
    _emit(args, letters, human)
    return 0


def _replay_dead_letters(args: argparse.Namespace, settings: Settings, letters: list[dict[str, Any]],
                         record: Callable[[list[dict[str, Any]]], Any]) -> int:
    from trainwire.consumers.dead_letter_replay import replay_dead_letters
    from trainwire.infra.codecs import codec_for
    from trainwire.infra.log import open_producer

    producer = None if args.dry_run else open_producer(settings)
    try:
        result = replay_dead_letters(letters, producer, codec_for(settings), record, again=args.again,
                                     flush_timeout=settings.flush_timeout_seconds)
    finally:
        if producer is not None:
            producer.close()
    fields = ("ts", "topic", "partition", "offset", "reason")
    payload = {"dry_run": result.dry_run, "replayed": len(result.replayed), "skipped": len(result.skipped),
               "letters": [{k: d[k] for k in fields} for d in result.replayed],
               "skipped_letters": [{k: d[k] for k in (*fields, "replayed_at", "replayed_by")} for d in result.skipped]}
    lines = [f"  {d['topic']}[{d['partition']}]@{d['offset']}  {d['reason'][:120]}" for d in result.replayed]
    lines.append(f"{'would replay' if result.dry_run else 'replayed'} {len(result.replayed)} dead letter(s)"
                 + (" (dry run: nothing injected)" if result.dry_run else " into the topics they were read from")
                 + (f"; skipped {len(result.skipped)} replayed before (--again to replay them too)"
                    if result.skipped else ""))
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from trainwire.dashboard.serve import serve_dashboard

    serve_dashboard(_settings(args), args.port)
    return 0


def cmd_store_ddl(args: argparse.Namespace) -> int:
    from trainwire.infra.store.connect import schema_ddl

    cluster = args.cluster or load_settings().store_cluster
    statements = schema_ddl(cluster)
    _emit(args, {"cluster": cluster, "statements": statements}, ";\n\n".join(statements) + ";")
    return 0


_LLAMAFACTORY_KEYWORDS = ("experiment", "run_name", "team", "dataset_source", "dataset_license", "dataset_version")


def _llamafactory_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The options given (a config's `trainwire:` section gives the rest) as LlamaFactoryCallback keywords."""
    keywords = {name: getattr(args, name) for name in _LLAMAFACTORY_KEYWORDS if getattr(args, name) is not None}
    if args.dataset_preprocessing:
        keywords["dataset_preprocessing"] = args.dataset_preprocessing
    if args.tag:
        pairs = [tag.partition("=") for tag in args.tag]
        if bad := [key for key, sep, _ in pairs if not sep or not key]:
            raise ValueError(f"--tag {bad[0]!r}: expected KEY=VALUE")
        keywords["tags"] = {key: value for key, _, value in pairs}
    if args.stop_on_block:
        keywords["stop_on_block"] = True
    return keywords


def _llamafactory_options(args: argparse.Namespace) -> list[str]:
    """The options again, for `trainwire llamafactory train` relaunched under torchrun."""
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _LLAMAFACTORY_KEYWORDS
               if getattr(args, name) is not None]
    options += [f"--dataset-preprocessing={step}" for step in args.dataset_preprocessing or []]
    options += [f"--tag={tag}" for tag in args.tag or []]
    options += ["--stop-on-block"] * args.stop_on_block + [f"--kafka={args.kafka}"] * bool(args.kafka)
    return options + ["--json"] * args.json


def cmd_llamafactory_train(args: argparse.Namespace) -> int:
    from trainwire.producers import llamafactory

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    if not arguments:
        raise ValueError("llamafactory train: give CONFIG.yaml [key=value …] (or -- --flag value …), as "
                         "llamafactory-cli train takes")
    keywords = _llamafactory_keywords(args)
    read = llamafactory.read_args(arguments)  # a bad config is refused here, before any process is launched
    launch = llamafactory.torchrun_command(["llamafactory", "train", *_llamafactory_options(args), "--", *arguments],
                                           os.environ, llamafactory.device_count())
    if launch is not None:
        command, env = launch
        print(f"trainwire: launching {' '.join(command)}", file=sys.stderr)
        return subprocess.run(command, env=env).returncode
    callback = llamafactory.run_exp(read, settings=_settings(args), **keywords)
    summary = callback.summary()
    if summary is not None:
        _emit(args, summary, f"trainwire: run {summary['run_id']} {summary['status']} after "
                             f"{summary['completed_steps']} steps (trainwire run {summary['run_id']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainwire", description="Telemetry pipeline for LLM fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--kafka", metavar="BOOTSTRAP", help="Kafka bootstrap servers (default: the local log)")
        p.add_argument("--store", metavar="DSN", help="clickhouse-connect DSN (default: chdb under TRAINWIRE_HOME)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        return p

    demo = command("demo", "simulated concurrent training jobs through the whole pipeline")
    demo.add_argument("--jobs", type=int, default=4)
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--inject", metavar="KIND[,KIND]", help="faults, one job each: nan, spike, gradnorm")
    demo.add_argument("--headless", action="store_true", help="no dashboard; exit once every event is stored")
    demo.add_argument("--step-seconds", type=float, help="pause between steps (default 0.25, headless 0.005)")
    demo.add_argument("--port", type=int, default=8501)
    demo.add_argument("--host", help="dashboard address (default 127.0.0.1; TRAINWIRE_DASHBOARD_HOST)")
    demo.set_defaults(func=cmd_demo)

    consume = command("consume", "ingest events into ClickHouse and run the detectors")
    consume.add_argument("--drain", action="store_true", help="exit once caught up with the transport")
    consume.add_argument("--idle-seconds", type=float, default=2.0, help="with --drain: quiet time that ends it")
    consume.add_argument("--instance-id", help="Kafka group.instance.id, stable across restarts of this consumer "
                         "(default: <host>-<group>-<slot>)")
    consume.set_defaults(func=cmd_consume)

    alerts = command("alerts", "the alert consumer: page through the configured sinks (docs/alerting.md); "
                     "`status`: deliveries per sink; `test`: send a test page to each sink")
    alerts.add_argument("action", nargs="?", choices=["run", "status", "test", *_SILENCE_ACTIONS], default="run",
                        help="run (default), status, test; silence, silences, unsilence ID")
    alerts.add_argument("silence_id", nargs="?", metavar="ID", help="unsilence: the silence to end")
    alerts.add_argument("--drain", action="store_true", help="run: exit once caught up and every page is settled")
    alerts.add_argument("--idle-seconds", type=float, default=2.0, help="with --drain: quiet time that ends it")
    alerts.add_argument("--severity", choices=["info", "warning", "critical", "block"], default="critical",
                        help="test: the test page's severity")
    for name in _SILENCE_MATCHERS:
        alerts.add_argument(f"--{name}", metavar=name.upper(), help=f"silence: pages of this {name} (all given "
                            "must match)" + ("; " + RUN_HELP if name == "run" else ""))
    alerts.add_argument("--for", dest="for_", metavar="DURATION", help="silence: for this long (30m, 2h, 1d)")
    alerts.add_argument("--until", metavar="TIME", help="silence: until this ISO 8601 time (UTC unless it names a "
                        "zone)")
    alerts.add_argument("--reason", help="silence: why (required); unsilence: why it ends early")
    alerts.add_argument("--all", action="store_true", help="silences: ended ones too")
    alerts.add_argument("--actor", help=f"who silences ({_ACTOR_DEFAULT}); recorded in the audit log")
    alerts.set_defaults(func=cmd_alerts)

    command("runs", "list stored runs").set_defaults(func=cmd_runs)

    run = command("run", "one run's summary")
    run.add_argument("run_id")
    run.set_defaults(func=cmd_run)
    add_export_command(command, _settings)

    up = command("up", "ingest, read API and dashboard (one process on the embedded defaults)")
    up.add_argument("--port", type=int, default=8501, help="dashboard port")
    up.add_argument("--host", help="dashboard address (default 127.0.0.1; TRAINWIRE_DASHBOARD_HOST)")
    up.add_argument("--no-dashboard", action="store_true")
    up.set_defaults(func=cmd_up)
    for p in (consume, up):
        p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on PORT (/metrics)")
        p.add_argument("--metrics-host", metavar="ADDRESS", help="address of the metrics endpoint (default 127.0.0.1, "
                       "TRAINWIRE_METRICS_HOST; anything else warns: it has no authentication)")

    spool = sub.add_parser("spool", help="events spooled on this machine while Kafka was unreachable")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    replay = spool_sub.add_parser("replay", help="send the spools that no running process owns to Kafka")
    replay.add_argument("--kafka", metavar="BOOTSTRAP")
    replay.add_argument("--json", action="store_true")
    replay.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker")
    replay.set_defaults(func=cmd_spool_replay)

    dead = sub.add_parser("dead-letters", help="records ingest could not store: list them, replay them once fixed")
    dead_sub = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = dead_sub.add_parser("list", help="dead letters, newest first: time, topic[partition]@offset, reason")
    dead_list.add_argument("--limit", type=int, default=100, metavar="N", help="the newest N (default 100; 0: all)")
    dead_list.set_defaults(func=cmd_dead_letters, action="list")
    dead_replay = dead_sub.add_parser("replay", help="re-inject dead letters' original bytes into the topics they "
                                      "were read from (each once: a second replay skips it unless --again)")
    dead_replay.add_argument("--dry-run", action="store_true", help="say what would be replayed; inject nothing")
    dead_replay.add_argument("--again", action="store_true", help="also replay dead letters replayed before")
    dead_replay.add_argument("--actor", help=f"who replays, recorded with each replay ({_ACTOR_DEFAULT})")
    dead_replay.set_defaults(func=cmd_dead_letters, action="replay", limit=None)
    for p in (dead_list, dead_replay):
        p.add_argument("--kafka", metavar="BOOTSTRAP", help="Kafka bootstrap servers (default: the local log)")
        p.add_argument("--store", metavar="DSN", help="clickhouse-connect DSN (default: chdb under TRAINWIRE_HOME)")
        p.add_argument("--json", action="store_true", help="print one JSON object" + (
            " (payloads in base64)" if p is dead_list else ""))
        p.add_argument("--since", metavar="DURATION|ISO-TIME", help="only dead letters since then (15m, 2h, 7d, "
                       "or a time such as 2025-06-01T12:00, UTC unless it names a zone)")
        p.add_argument("--topic", metavar="T", help="only those read from this topic (its full, prefixed name)")
        p.add_argument("--reason-contains", metavar="S", help="only those whose reason contains S (any case)")

    store = sub.add_parser("store", help="the ClickHouse schema")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    ddl = store_sub.add_parser("ddl", help="print the DDL the migrations run (for a server, or --cluster)")
    ddl.add_argument("--cluster", help="render for this ClickHouse cluster (default: TRAINWIRE_STORE_CLUSTER)")
    ddl.add_argument("--json", action="store_true")
    ddl.set_defaults(func=cmd_store_ddl)

    gates = command("gates", "evaluate a run's quality gates G1–G6 (exit 0 passed, 1 warnings, 2 blocked; "
                    "6 no such run, 7 ambiguous RUN, 8 not evaluated)")
    gates.error = functools.partial(_gates_usage_error, gates)  # argparse's exit 2 would read as "blocked"
    gates.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    gates.add_argument("--baseline", metavar="RUN|FILE", help="a run, or a JSON file of metric → value")
    gates.add_argument("--metric", metavar="NAME[:higher|lower]", help="G4's metric (default: eval_loss, "
                       "eval_accuracy or train_loss, the first both have)")
    gates.add_argument("--actor", help=f"who asks ({_ACTOR_DEFAULT})")
    gates.set_defaults(func=cmd_gates, error_exit=EXIT_GATES_NOT_EVALUATED)

    from trainwire.cli_audit import add_audit_command

    add_audit_command(command)

    registry = command("registry", "model registry: status [RUN_ID], request, approve, archive RUN_ID")
    registry.add_argument("action", choices=["status", "request", "approve", "archive"])
    registry.add_argument("run_id", nargs="?")
    registry.add_argument("--actor", help=f"who acts ({_ACTOR_DEFAULT})")
    registry.add_argument("--reason", help="why (required to archive)")
    registry.set_defaults(func=cmd_registry)

    llamafactory = sub.add_parser("llamafactory", help="train with LLaMA-Factory, recorded by trainwire")
    llamafactory_sub = llamafactory.add_subparsers(dest="llamafactory_command", required=True)
    lf_train = llamafactory_sub.add_parser(
        "train", help="llamafactory-cli train with trainwire's callback (torchrun on several devices, as it does)",
        description="Takes what `llamafactory-cli train` takes: CONFIG.yaml (or .json) and key=value overrides, or "
                    "-- and --flag value arguments. trainwire's options go before them; a `trainwire:` section "
                    "in the config gives the same keywords (docs/llamafactory.md).")
    lf_train.add_argument("--experiment", help="experiment name (default: output_dir's name)")
    lf_train.add_argument("--run-name", help="run name (default: TrainingArguments.run_name)")
    lf_train.add_argument("--team", help="team/tenant (default: TRAINWIRE_TEAM)")
    lf_train.add_argument("--dataset-source", metavar="SOURCE",
                          help="where the data came from, e.g. hf:tatsu-lab/alpaca")
    lf_train.add_argument("--dataset-license", metavar="LICENSE", help="the dataset's licence, e.g. cc-by-nc-4.0")
    lf_train.add_argument("--dataset-version", metavar="VERSION", help="the dataset's version or revision")
    lf_train.add_argument("--dataset-preprocessing", metavar="STEP", action="append",
                          help="a preprocessing step beyond LLaMA-Factory's arguments (repeatable)")
    lf_train.add_argument("--tag", metavar="KEY=VALUE", action="append", help="a tag on the run (repeatable)")
    lf_train.add_argument("--stop-on-block", action="store_true", help="opt in to the stop switch")
    lf_train.add_argument("--kafka", metavar="BOOTSTRAP", help="Kafka bootstrap servers (default: the local log)")
    lf_train.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    lf_train.add_argument("arguments", nargs=argparse.REMAINDER, metavar="CONFIG.yaml [key=value …]")
    lf_train.set_defaults(func=cmd_llamafactory_train)

    dashboard = command("dashboard", "serve the Streamlit dashboard")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument("--host", help="dashboard address (default 127.0.0.1; TRAINWIRE_DASHBOARD_HOST)")
    dashboard.set_defaults(func=cmd_dashboard)
    return parser


def _configure_audit(args: argparse.Namespace) -> None:
    """The audit log's key, anchor and lock for this process's store (docs/governance.md)."""
    if args.command == "audit" and args.target == "verify-bundle":  # offline: an auditor's machine has no home
        return
    try:
        from trainwire.infra.store.audit_config import configure_audit
    except ImportError:  # a producer-only install: no store here
        return
    configure_audit(_settings(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    from trainwire.infra.log.base import FatalTransportError, TransportUnavailableError

    try:  # every failure ends as one line (JSON under --json) and an exit code: trainwire/cli_errors.py
        check_arguments(args)
        _configure_audit(args)
        if needs_kafka_check(args) and (settings := _settings(args)).kafka:
            _check_transport(settings)
        return args.func(args)
    except (ConfigError, ValueError) as err:  # `gates` exits 2 for "blocked": its errors have their own code
        return report(args, Failure(str(err), getattr(args, "error_exit", 2)))
    except TransportUnavailableError as err:  # Kafka unreachable, or refusing these credentials or certificates
        return report(args, Failure(str(err), EXIT_TRANSPORT_UNAVAILABLE))
    except FatalTransportError as err:  # e.g. a consumer fenced out of its group: stop, say why
        return report(args, Failure(str(err), 4))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        failure = describe_failure(err, lambda: _settings(args).store_dsn) or unexpected(err)
        return report(args, Failure(failure.message, getattr(args, "error_exit", failure.exit_code)))


if __name__ == "__main__":
    sys.exit(main())
