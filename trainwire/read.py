"""The public read API: runs, their summaries and their series as pandas DataFrames (or Arrow tables), for notebooks.

    import trainwire.read as tw

    with tw.connect() as store:                      # the store `trainwire runs` reads
        runs = store.runs(experiment="sft-llama", status="completed", params={"lora_rank": 16})
        steps = store.steps("7c0ffee1")              # every step, full resolution
        curves = store.history(runs.run_id[:2], metrics=["loss"])

The same calls answer in every case: the embedded store opened here, a ClickHouse server (`dsn="http://…"`), or,
while `trainwire up` owns the embedded store (chdb lets one process open it), that process over its loopback read
API. Series travel as Arrow end to end (ClickHouse's Arrow output in-process, an Arrow IPC stream from `up`), so a
100,000-step history costs no Python per row. Times are timezone-aware UTC; a NaN loss stays NaN, and in Arrow form
apart from NULL (a value never logged). docs/notebooks.md has a worked example and the MLflow / W&B equivalents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from trainwire.cli_runs import EXIT_NO_SUCH_RUN, RunLookupError, match_run
from trainwire.infra.config import Settings, load_settings

__all__ = ["AmbiguousRunError", "Store", "UnknownRunError", "connect"]

SERIES = ("steps", "evals", "gpu_samples", "alerts", "checkpoints")
_MISSING = object()


class UnknownRunError(RunLookupError, LookupError):
    """RUN names no stored run (the CLI exits 6 on it)."""


class AmbiguousRunError(RunLookupError, LookupError):
    """RUN is a prefix or name that fits several runs, listed in `candidates` (the CLI exits 7 on it)."""


def connect(dsn: str | None = None, *, home: str | Path | None = None, settings: Settings | None = None) -> Store:
    """The store the settings name, found as the CLI finds it: `dsn` (a clickhouse-connect DSN: `chdb:///path`
    or `http(s)://user:password@host:8123/db`) or TRAINWIRE_STORE, else the embedded store under `home`
    (TRAINWIRE_HOME, ~/.trainwire). An embedded store that a running `trainwire up` owns is read through it."""
    from trainwire.infra.store.api import RemoteReader, running_api
    from trainwire.infra.store.audit_config import configure_audit

    if settings is None:
        settings = load_settings(store=dsn, home=home)
    configure_audit(settings)  # registry stages count only transitions this home's trusted keys vouch for
    if settings.embedded_store and (url := running_api(settings.home)):
        return Store(RemoteReader(url, settings.home), via="up")
    from trainwire.infra.store import connect_store
    from trainwire.infra.store.read import StoreReader

    client = connect_store(settings.store_dsn)
    return Store(_InProcess(StoreReader(client)), via="embedded" if settings.embedded_store else "server")


class _InProcess:
    """The columnar reads of a store opened in this process, called as `RemoteReader.arrow` calls them."""

    def __init__(self, reader: Any):
        self.reader = reader

    def arrow(self, method: str, **kwargs: Any) -> Any:
        return getattr(self.reader, method)(**kwargs)

    def migrated(self) -> bool:
        return self.reader.migrated()

    def close(self) -> None:
        self.reader.client.close()


class Store:
    """One connection to the store; close it (or use `with`) to let another process open an embedded store.

    Every series method takes RUN as the CLI does (a full id, a unique id prefix of 4+ characters, or a run name)
    and `as_arrow=True` for a `pyarrow.Table` instead of a pandas DataFrame."""

    def __init__(self, backend: Any, via: str):
        self._backend = backend
        self.via = via  # "embedded", "server" or "up": how this store is read
        self._stored_ids: set[str] = set()  # full ids already found: an exact id always names its run

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self._backend, "close"):
            self._backend.close()

    def __repr__(self) -> str:
        return f"<trainwire store via {self.via}>"

    def _table(self, method: str, **kwargs: Any) -> Any:
        return self._backend.arrow(method, **{k: v for k, v in kwargs.items() if v is not None})

    def _migrated(self) -> bool:
        """A store no ingest has set up yet has no tables and reads as empty (`up` serves a migrated one only)."""
        return not hasattr(self._backend, "migrated") or self._backend.migrated()

    # --- Runs ------------------------------------------------------------------------------------------------------

    def resolve(self, run: str) -> str:
        """The full id of the run `run` names; UnknownRunError or AmbiguousRunError (with `candidates`) if none or
        several, worded as the CLI words them. A full id found once is not looked up again: a notebook that reads
        a run's series call after call pays one lookup (~10 ms), not one per call."""
        if (text := str(run).strip()) in self._stored_ids:
            return text
        candidates = self._table("run_candidates", text=text).to_pylist() if self._migrated() else []
        try:
            run_id = match_run(candidates, text)
        except RunLookupError as err:
            error = UnknownRunError if err.exit_code == EXIT_NO_SUCH_RUN else AmbiguousRunError
            raise error(str(err), err.exit_code, err.candidates) from None
        if run_id == text:
            self._stored_ids.add(run_id)
        return run_id

    def runs(self, experiment: str | Iterable[str] | None = None, team: str | Iterable[str] | None = None,
             status: str | Iterable[str] | None = None, tags: Mapping[str, str] | None = None,
             since: datetime | str | None = None, until: datetime | str | None = None,
             gate: str | Iterable[str] | None = None, stage: str | Iterable[str] | None = None,
             params: Mapping[str, Any] | None = None, *, as_arrow: bool = False) -> Any:
        """Stored runs, newest first: the columns of `trainwire runs --json`, then `user`, `gate` (the latest gate
        evaluation: passed, warnings, blocked; None before one), `stage` (the registry's, None before one), a
        `tags.<key>` column per tag and a `params.<name>` column per hyperparameter (nested ones dotted, as MLflow's
        `search_runs` names them).

        Each filter keeps runs matching any of the values given (a string or a list): `status` is running,
        completed, failed or stopped; `tags` keeps runs carrying every key with its value; `since`/`until` bound
        the start (a datetime, naive meaning UTC, or ISO 8601 text); `params` keeps runs whose hyperparameter
        equals the value, or is one of a set's values (`{"learning_rate": {1e-4, 2e-4}}`)."""
        import pyarrow as pa

        if not self._migrated():
            return _form(pa.table({"run_id": pa.array([], pa.string())}), as_arrow)
        table = self._table("runs_table", experiments=_listed(experiment), teams=_listed(team),
                            statuses=_listed(status), gates=_listed(gate), since=_when(since, "since"),
                            until=_when(until, "until"), tags={str(k): str(v) for k, v in (tags or {}).items()})
        stages = self._stages()
        table = table.append_column("stage", pa.array([stages.get(r) for r in table.column("run_id").to_pylist()],
                                                      pa.string()))
        hyperparameters = [_flat(_parsed(text)) for text in table.column("hyperparameters_json").to_pylist()]
        keep = [_has_params(flat, params or {}) and (stage is None or run_stage in _listed(stage))
                for flat, run_stage in zip(hyperparameters, table.column("stage").to_pylist())]
        if not all(keep):
            table = table.filter(pa.array(keep, pa.bool_()))
            hyperparameters = [flat for flat, kept in zip(hyperparameters, keep) if kept]
        table = _tag_columns(table)
        for name in sorted({name for flat in hyperparameters for name in flat}):
            table = table.append_column(f"params.{name}", _column([flat.get(name) for flat in hyperparameters]))
        return _form(table.drop_columns(["hyperparameters_json"]), as_arrow)

    def run(self, run: str) -> dict[str, Any]:
        """One run as `trainwire run RUN --json` reports it (summary, `open_alerts`, the latest `gates`), with its
        `host`, `user`, `tags`, `params` (the hyperparameters as logged) and registry `stage`; plain Python values,
        times as timezone-aware UTC datetimes."""
        run_id = self.resolve(run)
        summary = self._table("run_summary_table", run_id=run_id).to_pylist()[0]
        listed = self._table("runs_table", run_ids=[run_id]).to_pylist()
        started = listed[0] if listed else {}
        alerts = self._table("open_incidents_table", run_id=run_id).to_pylist()
        latest = self._table("latest_gate_table", run_id=run_id).to_pylist()
        gates = None
        if latest:
            gate = latest[0]
            gates = {"overall": gate["overall"], "evaluated_at": gate["evaluated_at"], "trigger": gate["trigger"],
                     "baseline": gate["baseline"] or None,
                     "gates": [{k: g[k] for k in ("gate", "name", "on_fail", "status", "message")}
                               for g in json.loads(gate["gates_json"] or "[]")]}
        return {**summary,
                "open_alerts": [{k: a[k] for k in ("rule", "severity", "step", "fired_at", "message")} for a in alerts],
                "gates": gates, "host": started.get("host"), "user": started.get("user"),
                "tags": dict(started.get("tags") or []), "params": _parsed(started.get("hyperparameters_json")),
                "stage": self._stages().get(run_id)}

    def _stages(self) -> dict[str, str]:
        return dict(zip(*self._table("registry_stages_table").select(["run_id", "stage"]).to_pydict().values()))

    # --- Series ----------------------------------------------------------------------------------------------------

    def steps(self, run: str, metrics: Iterable[str] | None = None, *, every: int | None = None,
              max_points: int | None = None, as_arrow: bool = False) -> Any:
        """A run's steps, oldest first: step, ts and the metrics it logged (of loss, learning_rate, grad_norm,
        tokens_per_s, epoch, samples_per_s, batch_time_s, tokens, and each custom metric), or those named. Full
        resolution unless `every=N` (the steps that are multiples of N, values as logged) or `max_points=N` (the
        dashboard's buckets: per bucket its last step and time, the finite losses' mean/min/max, how many were
        NaN/±Inf, mean grad norm and tokens/s)."""
        return _form(self._history([self.resolve(run)], metrics, every, max_points).drop_columns(["run_id"]),
                     as_arrow)

    def history(self, runs: Iterable[str] | str, metrics: Iterable[str] | None = None, *, every: int | None = None,
                max_points: int | None = None, as_arrow: bool = False) -> Any:
        """Several runs' steps in long format (run_id, step, ts, metric columns), by run then step: one frame to
        compare runs (`df.pivot(index="step", columns="run_id", values="loss")`). Arguments as `steps`; run_id is
        dictionary-encoded (a pandas category): a run's id is not repeated in memory once per step."""
        run_ids = [self.resolve(run) for run in ([runs] if isinstance(runs, str) else runs)]
        return _form(self._history(run_ids, metrics, every, max_points), as_arrow)

    def _history(self, run_ids: list[str], metrics: Iterable[str] | None, every: int | None,
                 max_points: int | None) -> Any:
        import pyarrow as pa

        wanted = None if metrics is None else [str(m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
        if max_points is not None:
            if every is not None:
                raise ValueError("give every or max_points, not both")
            table = pa.concat_tables([self._table("curve_table", run_id=run_id, max_points=int(max_points))
                                      for run_id in run_ids]) if run_ids else None
            if table is not None and wanted is not None:
                table = table.select([name for name in table.column_names
                                      if name in ("run_id", "step", "ts", "steps")
                                      or any(name == m or name.startswith(f"{m}_") for m in wanted)])
        else:
            table = self._table("steps_table", run_ids=run_ids, metrics=wanted, every=every) if run_ids else None
        return pa.table({"run_id": pa.array([], pa.string())}) if table is None else _labelled(table, run_ids)

    def evals(self, run: str, metrics: Iterable[str] | None = None, *, as_arrow: bool = False) -> Any:
        """A run's evaluations: step, ts and what they logged (of epoch, eval_loss, eval_accuracy, perplexity,
        runtime_s, and each task metric), or the metrics named."""
        wanted = None if metrics is None else [str(m) for m in metrics]
        return self._series("evals_table", run, as_arrow, metrics=wanted)

    def gpu_samples(self, run: str, *, max_points: int | None = None, as_arrow: bool = False) -> Any:
        """A run's GPU samples (ts, host, rank, gpu_index, name, utilisation, memory, temperature, power, clocks),
        or with `max_points` the dashboard's per-GPU time buckets (at most that many per GPU)."""
        if max_points is None:
            return self._series("gpu_samples_table", run, as_arrow)
        table = self._table("gpu_series_table", run_id=self.resolve(run), max_points=int(max_points))
        return _form(table.drop_columns(["run_id"]), as_arrow)

    def alerts(self, run: str, *, as_arrow: bool = False) -> Any:
        """Every alert transition of a run (firing, resolved), oldest first: rule, severity, state, step, value,
        threshold, message and the incident's dedup key."""
        return self._series("alerts_table", run, as_arrow)

    def checkpoints(self, run: str, *, as_arrow: bool = False) -> Any:
        """A run's checkpoints: step, ts, path, files (name, size, sha256), eval_loss, is_best, and `deleted` for
        one rotated away later."""
        return self._series("checkpoints_table", run, as_arrow)

    def _series(self, method: str, run: str, as_arrow: bool, **kwargs: Any) -> Any:
        table = self._table(method, run_ids=[self.resolve(run)], **kwargs)
        return _form(table.drop_columns([name for name in ("run_id",) if name in table.column_names]), as_arrow)


def _form(table: Any, as_arrow: bool) -> Any:
    return table if as_arrow else table.to_pandas()


def _labelled(table: Any, run_ids: list[str]) -> Any:
    """`history`'s run_id column, dictionary-encoded however the rows came (one run's come without it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "run_id" not in table.column_names:
        ids = pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), table.num_rows),
                                             pa.array(run_ids[:1], pa.string()))
        return table.add_column(0, "run_id", ids)
    if not pa.types.is_dictionary(table.schema.field("run_id").type):
        return table.set_column(0, "run_id", pc.dictionary_encode(table.column("run_id")))
    return table


def _listed(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _when(value: datetime | str | None, name: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{name}: expected a datetime or ISO 8601 text, got {value!r}") from None


def _parsed(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hyperparameters as dotted names ({"lora": {"r": 16}} → {"lora.r": 16})."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _has_params(flat: dict[str, Any], wanted: Mapping[str, Any]) -> bool:
    for name, value in wanted.items():
        logged = flat.get(name, _MISSING)
        if isinstance(value, (set, frozenset)):
            if logged is _MISSING or not any(_same(logged, v) for v in value):
                return False
        elif logged is _MISSING or not _same(logged, value):
            return False
    return True


def _same(logged: Any, wanted: Any) -> bool:
    """Equal as values, a bool never equal to 1 or 0 (a flag is not a count)."""
    return isinstance(logged, bool) == isinstance(wanted, bool) and logged == wanted


def _column(values: list[Any]) -> Any:
    """An Arrow column of one hyperparameter across runs; values of mixed types (a number in one run, text in
    another) become their JSON text, so the column still has one type."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                         for v in values], pa.string())


def _tag_columns(table: Any) -> Any:
    """The `tags` map as one `tags.<key>` column per key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tags = table.column("tags")
    keys = sorted(pc.unique(tags.combine_chunks().keys).to_pylist())
    table = table.drop_columns(["tags"])
    for key in keys:
        table = table.append_column(f"tags.{key}", pc.map_lookup(tags, pa.scalar(key), "first"))
    return table
