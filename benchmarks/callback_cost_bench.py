"""What TrainwireCallback costs a training loop, end to end: the same tiny fine-tune with and without it.

    .venv/bin/python benchmarks/callback_cost_bench.py [--pairs 20] [--steps 100] [--logging-steps 1]

Needs nothing: a tiny randomly initialised Llama (built from a config) with a peft LoRA adapter, random token data
made here, `transformers.Trainer` on the CPU, and the callback on the local log in a temporary home (no broker).
Writes benchmarks/results/<name>.json (callback_cost by default). Interleaved A/B: each pair trains once without and
once with the callback, the order alternating pair by pair, so a drift in the machine's load falls on both arms.
Per pair:
  - the added wall time of `trainer.train()` per step, (with - without) / steps: the headline is its median;
  - the added median step (the median of each run's step-to-step times): the steady state, blind to bursts of load;
  - the callback's train begin (run started: environment, lineage, init), and the run's end after training (run
    ended, flush: outside `trainer.train()` since the run ends at the model's save or a grace period after it);
  - the CPU time added on the training thread and on the process's other threads;
and that nothing was lost: every logged step, the run started and the run ended are in the local log, none dropped.
The first run in the process pays what a process pays once (schema registry, package scan): its pair is kept in
`each_pair`; the warm-up run before the pairs is without the callback.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tiny_training: the model and data of the tests

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import write_result  # noqa: E402

from tests.tiny_training import TokenDataset, tiny_lora_model  # noqa: E402
from transformers.trainer_callback import PrinterCallback, TrainerCallback  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.producers import TrainwireCallback  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402
from trainwire.schemas import decode_record  # noqa: E402

transformers.logging.set_verbosity_error()


class TimedCallback(TrainwireCallback):
    """The callback as shipped, with its train begin timed."""

    begin_s = 0.0

    def on_train_begin(self, *args, **kwargs):
        started = time.perf_counter()
        super().on_train_begin(*args, **kwargs)
        self.begin_s = time.perf_counter() - started


class StepClock(TrainerCallback):
    """When each step ended, in both arms."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, *args, **kwargs):
        self.ends.append(time.perf_counter())

    def median_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.ends, self.ends[1:]))


def train_once(out: Path, dataset, steps: int, logging_steps: int, callback=None) -> dict:
    """One `trainer.train()`: its wall seconds, median step, and the CPU seconds of the training thread and of the
    process's other threads."""
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=logging_steps, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=7)
    clock = StepClock()
    trainer = transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=dataset,
                                   callbacks=[callback, clock] if callback else [clock])
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout, in either arm
    cpu, process_cpu, started = time.thread_time(), time.process_time(), time.perf_counter()
    trainer.train()
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return {"seconds": wall, "median_step_s": clock.median_step(), "cpu_s": cpu,
            "other_threads_cpu_s": time.process_time() - process_cpu - cpu}


def stored_kinds(settings: Settings) -> Counter:
    with sqlite3.connect(settings.local_log_path) as conn:
        return Counter(decode_record(value)[0] for (value,) in conn.execute("SELECT value FROM records"))


def with_callback(home: Path, dataset, steps: int, logging_steps: int) -> dict:
    settings = Settings(home=home)
    callback = TimedCallback(experiment="callback-cost", settings=settings)
    measured = train_once(home / "out", dataset, steps, logging_steps, callback)
    # the run ends after training (at the model's save, the Trainer's next event, a grace period or exit): end it
    started = time.perf_counter()
    callback.finish("completed")
    end_s = time.perf_counter() - started
    run = callback.run
    emitted, dropped, invalid = run.events_emitted, run.events_dropped, run.events_invalid
    close_all()  # stop this run's sender: the next run starts from a quiet process
    kinds = stored_kinds(settings)
    # nothing lost: every step the Trainer logged, and the run's start and end, are in the log
    assert (kinds["step"], kinds["run_started"], kinds["run_ended"]) == (steps // logging_steps, 1, 1), kinds
    assert dropped == invalid == 0 and sum(kinds.values()) == emitted, (emitted, dropped, invalid, kinds)
    return {**measured, "begin_s": callback.begin_s, "end_s": end_s, "events": emitted}


def one_pair(home: Path, dataset, steps: int, logging_steps: int, order: tuple[str, str]) -> dict:
    runs = {}
    for arm in order:
        if arm == "with":
            runs[arm] = with_callback(home, dataset, steps, logging_steps)
        else:
            runs[arm] = train_once(home / "bare", dataset, steps, logging_steps)
    with_, without = runs["with"], runs["without"]
    per_step_ms = 1000 / steps
    return {
        "without_s": round(without["seconds"], 4), "with_s": round(with_["seconds"], 4),
        "added_ms_per_step": round((with_["seconds"] - without["seconds"]) * per_step_ms, 3),
        "added_median_step_ms": round((with_["median_step_s"] - without["median_step_s"]) * 1000, 3),
        "added_training_thread_cpu_ms_per_step": round((with_["cpu_s"] - without["cpu_s"]) * per_step_ms, 3),
        "added_other_threads_cpu_ms_per_step":
            round((with_["other_threads_cpu_s"] - without["other_threads_cpu_s"]) * per_step_ms, 3),
        "train_begin_ms": round(with_["begin_s"] * 1000, 1), "run_end_ms": round(with_["end_s"] * 1000, 1),
        "events_stored": with_["events"], "order": "-".join(order)}


def summary(values: list[float], digits: int = 3) -> dict:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), digits), "p25": round(quartiles[0], digits),
            "p75": round(quartiles[2], digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads; 1 leaves the other core to the process's threads and the machine")
    parser.add_argument("--name", default="callback_cost", help="result file name (results/<name>.json)")
    parser.add_argument("--note", default="", help="what else ran on the machine, the commit measured, …")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    dataset = TokenDataset(8 * args.steps)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        train_once(Path(tmp) / "warm-up", dataset, args.steps, args.logging_steps)
        pairs = []
        for pair in range(args.pairs):
            order = ("without", "with") if pair % 2 == 0 else ("with", "without")
            pairs.append(one_pair(Path(tmp) / f"pair-{pair}", dataset, args.steps, args.logging_steps, order))
            print(f"pair {pair + 1}/{args.pairs}: {pairs[-1]}", file=sys.stderr)

    result = {
        "note": args.note, "load_average_before": load_before, "load_average_after": load_average(),
        "setup": {"model": "LlamaForCausalLM 2 layers, hidden 32, vocab 64, LoRA r=4 on q_proj/v_proj",
                  "batch": "8 × 16 tokens", "dataset_rows": len(dataset), "steps": args.steps,
                  "logging_steps": args.logging_steps, "torch_threads": args.torch_threads,
                  "transport": "local log (SQLite) in a temporary home", "sample_gpus": True,
                  "gpus": torch.cuda.device_count(), "transformers": transformers.__version__,
                  "peft": peft.__version__, "torch": torch.__version__},
        "pairs": len(pairs),
        **{key: summary([p[key] for p in pairs]) for key in (
            "added_ms_per_step", "added_median_step_ms", "added_training_thread_cpu_ms_per_step",
            "added_other_threads_cpu_ms_per_step")},
        "step_ms_without": summary([p["without_s"] * 1000 / args.steps for p in pairs]),
        "step_ms_with": summary([p["with_s"] * 1000 / args.steps for p in pairs]),
        "train_begin_ms": summary([p["train_begin_ms"] for p in pairs], 1),
        "run_end_ms": summary([p["run_end_ms"] for p in pairs], 1),
        "each_pair": pairs,
    }
    path = write_result(args.name, result)
    print(path.read_text())


if __name__ == "__main__":
    main()
