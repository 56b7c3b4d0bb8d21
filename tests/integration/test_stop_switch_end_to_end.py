"""The stop switch end to end: a real tiny LoRA fine-tune whose loss turns NaN, the real ingest pipeline and detectors
on the local log and chdb, the real alert consumer paging a webhook and driving the stop switch, and the run's
listener; plus the round trip on the real broker."""

import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.integration.test_hf_callback import TokenDataset, tiny_lora_model  # noqa: E402
from tests.recording_server import RecordingServer  # noqa: E402
from trainwire.consumers.alerting.service import build_alerting, run_alerting  # noqa: E402
from trainwire.consumers.service import build_ingest, run_ingest  # noqa: E402
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings  # noqa: E402
from trainwire.infra.log import open_consumer  # noqa: E402
from trainwire.infra.log.topics import CONTROL  # noqa: E402
from trainwire.infra.store import connect_store  # noqa: E402
from trainwire.infra.store.read import StoreReader  # noqa: E402
from trainwire.producers import TrainingStopped, TrainwireCallback, init  # noqa: E402
from trainwire.schemas import decode  # noqa: E402

NAN_FROM_STEP = 5
STEP_SECONDS = 0.2  # a real step takes seconds; the tiny model's takes milliseconds
WAIT = 20.0


@contextmanager
def alerts_routed_in(settings):
    """Ingest (detectors included) and the real alert consumer (the stop switch and a webhook sink) in threads;
    yields the webhook receiver, a real HTTP server that records every page."""
    with RecordingServer() as pager:
        paging = settings.model_copy(update={"alerting": AlertingSettings(
            sinks=[SinkSettings(kind="webhook", url=pager.url, severities=("block",))])})
        pipeline = build_ingest(paging, on_alert=lambda alert: None)
        alerting = build_alerting(paging, group="test-alerts")
        stop = threading.Event()
        threads = [threading.Thread(target=run_ingest, args=(pipeline, stop)),
                   threading.Thread(target=run_alerting, args=(alerting, stop))]
        for thread in threads:
            thread.start()
        try:
            yield pager
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)


@pytest.fixture
def pages(local_settings):
    with alerts_routed_in(local_settings) as pager:
        yield pager


class NanLossTrainer(transformers.Trainer):
    """The loss becomes NaN from step NAN_FROM_STEP on, as in a diverging fine-tune."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.state.global_step + 1 >= NAN_FROM_STEP:  # global_step counts the steps already done
            return (loss[0] * math.nan, *loss[1:]) if return_outputs else loss * math.nan
        return loss


class RealisticStepTime(transformers.TrainerCallback):
    def __init__(self, after_nan=None):
        self.after_nan = after_nan

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(STEP_SECONDS)
        if self.after_nan is not None and state.global_step == NAN_FROM_STEP + 1:
            self.after_nan()


def train(tmp_path: Path, callback: TrainwireCallback, max_steps: int, after_nan=None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", eval_strategy="no", seed=7, report_to=[], use_cpu=True,
        disable_tqdm=True,  # logging_nan_inf_filter left on (the default): the callback turns it off
    )
    trainer = NanLossTrainer(model=tiny_lora_model(), args=args, train_dataset=TokenDataset(64),
                             callbacks=[callback, RealisticStepTime(after_nan)])
    trainer.train()
    return trainer


def stored_summary(settings, run_id: str) -> dict:
    """The run as stored, once ingest has stored its end."""
    client = connect_store(settings.store_dsn)
    try:
        reader = StoreReader(client)
        deadline = time.monotonic() + WAIT
        while (summary := reader.run_summary(run_id)) is None or summary["status"] == "running":
            assert time.monotonic() < deadline, f"run {run_id} not stored as ended: {summary}"
            time.sleep(0.2)
        return summary | {"checkpoints_stored": reader.checkpoints(run_id)}
    finally:
        client.close()


@pytest.mark.slow
def test_a_nan_loss_stops_an_opted_in_fine_tune_after_a_final_checkpoint(local_settings, pages, tmp_path):
    callback = TrainwireCallback(experiment="nan-lora", settings=local_settings, sample_gpus=False,
                                 stop_on_block=True)
    trainer = train(tmp_path, callback, max_steps=100)

    stopped_at = trainer.state.global_step
    assert NAN_FROM_STEP < stopped_at <= NAN_FROM_STEP + 10, "training did not stop within a few steps of the NaN"
    final = tmp_path / "out" / f"checkpoint-{stopped_at}"
    assert (final / "adapter_model.safetensors").is_file() and (final / "trainer_state.json").is_file()

    summary = stored_summary(local_settings, callback.run.run_id)
    assert summary["status"] == "stopped"
    assert summary["error"].startswith(f"loss_not_finite: ") and "nan" in summary["error"]
    assert summary["last_step"] == stopped_at
    assert [c["path"] for c in summary["checkpoints_stored"]] == [str(final)]
    (page,) = [p for p in pages.bodies() if p["run_id"] == callback.run.run_id]  # on-call was paged, once
    assert (page["rule"], page["severity"], page["step"]) == ("loss_not_finite", "block", NAN_FROM_STEP)


@pytest.mark.slow
def test_a_fine_tune_that_did_not_opt_in_is_not_stopped_by_the_same_alert(local_settings, pages, tmp_path):
    callback = TrainwireCallback(experiment="nan-lora", settings=local_settings, sample_gpus=False)

    def wait_for_the_alert():  # the block alert reaches the alert consumer while the run is still training
        pages.wait_for(1, WAIT)

    trainer = train(tmp_path, callback, max_steps=NAN_FROM_STEP + 6, after_nan=wait_for_the_alert)

    assert trainer.state.global_step == NAN_FROM_STEP + 6
    summary = stored_summary(local_settings, callback.run.run_id)
    assert (summary["status"], summary["error"]) == ("completed", None)
    assert summary["checkpoints_stored"] == [] and not list((tmp_path / "out").glob("checkpoint-*"))
    control = open_consumer(local_settings, "test-control-reader", [local_settings.topic(CONTROL)])
    assert [decode(r.value).run_id for r in control.poll(100, 0.5)] == []  # no command was sent
    control.close()


def test_a_training_loop_on_either_transport_is_stopped_through_the_sdk(any_settings):
    with alerts_routed_in(any_settings) as pager:
        run = init("nan-sdk", settings=any_settings, sample_gpus=False, stop_on_block=True)
        with pytest.raises(TrainingStopped) as stopped:
            with run:
                for step in range(1, int(WAIT / 0.05)):
                    run.log_step(step, loss=math.nan if step >= NAN_FROM_STEP else 1.0 / step)
                    run.check_stop()
                    time.sleep(0.05)
        assert step > NAN_FROM_STEP and stopped.value.reason == run.stop_reason
        summary = stored_summary(any_settings, run.run_id)
        assert [p["run_id"] for p in pager.wait_for(1)] == [run.run_id]
    assert (summary["status"], summary["error"]) == ("stopped", run.stop_reason)
    assert run.stop_reason.startswith("loss_not_finite: ")
