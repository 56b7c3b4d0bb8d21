"""`trainwire export RUN… --format parquet|csv [--out DIR]`: runs' series as files, for tools that read files.

Layout: DIR/<run id>/<series>.<format> for each series (steps, evals, gpu_samples, alerts, checkpoints), every
file written even when its series is empty (its columns still say what it would hold), and DIR/<run id>/run.json,
the run as `trainwire run RUN --json` prints it. Read through the public read API (trainwire/read.py), so what is
written is what `store.steps(RUN, as_arrow=True)` answers, at full resolution. In CSV, times are ISO 8601 UTC, a
NaN is `nan` and a value never logged an empty field (pyarrow reads them apart with `null_values=[""]`), and a
column of lists or maps (a checkpoint's files) is its JSON text.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainwire.cli_output import column, json_text, table
from trainwire.cli_runs import RUN_HELP, reports_run_lookup
from trainwire.infra.config import Settings

FILE_COLUMNS = (column("Run id", "run_id"), column("Series"), column("Rows", right=True), column("File", "path"))


def add_export_command(command: Callable[[str, str], argparse.ArgumentParser],
                       settings: Callable[[argparse.Namespace], Settings]) -> None:
    """Register `export` with the CLI's `command` (which adds --kafka, --store and --json)."""
    export = command("export", "write runs' series (steps, evals, GPU samples, alerts, checkpoints) to Parquet or "
                               "CSV files, one per series per run")
    export.add_argument("runs", nargs="+", metavar="RUN", help=RUN_HELP)
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="default: parquet")
    export.add_argument("--out", default=".", metavar="DIR", help="where DIR/<run id>/<series>.<format> go "
                        "(default: the current directory)")
    export.set_defaults(func=reports_run_lookup(lambda args: export_runs(args, settings(args))))


def export_runs(args: argparse.Namespace, settings: Settings) -> int:
    import trainwire.read as tw

    out = Path(args.out)
    written = []
    with tw.connect(settings=settings) as store:
        run_ids = list(dict.fromkeys(store.resolve(run) for run in args.runs))  # every RUN named before a write
        for run_id in run_ids:
            folder = out / run_id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "run.json").write_text(json_text(store.run(run_id), compact=False) + "\n")
            for series in tw.SERIES:
                data = getattr(store, series)(run_id, as_arrow=True)
                path = folder / f"{series}.{args.format}"
                _write(data, path, args.format)
                written.append({"run_id": run_id, "series": series, "rows": data.num_rows, "path": str(path)})
    human = table(written, FILE_COLUMNS, "") + f"\n{len(written)} files for {len(run_ids)} run(s) in {out}"
    print(json_text({"out": str(out), "format": args.format, "files": written}) if args.json else human)
    return 0


def _write(data: Any, path: Path, file_format: str) -> None:
    if file_format == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(data, path)
        return
    import pyarrow.csv as csv

    csv.write_csv(_flat_for_csv(data), path)


def _flat_for_csv(data: Any) -> Any:
    """CSV holds scalars: each list, map or struct column becomes its values' JSON text."""
    import pyarrow as pa

    for index, field in enumerate(data.schema):
        if pa.types.is_nested(field.type):
            values = data.column(index).to_pylist()  # few rows: checkpoints' file lists
            text = [None if value is None else json.dumps(value, default=str) for value in values]
            data = data.set_column(index, field.name, pa.array(text, pa.string()))
    return data
