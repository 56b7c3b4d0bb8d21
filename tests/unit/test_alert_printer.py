import io
import threading
import time

from trainwire.consumers.alert_printer import AlertPrinter
from trainwire.schemas import Alert


def alert(step: int) -> Alert:
    return Alert(event_id=f"a{step}", run_id="run-a", experiment="exp", ts_ms=1, rule="loss_not_finite",
                 severity="block", state="firing", step=step, message="train loss is nan", dedup_key=f"k{step}")


class SlowStream(io.StringIO):
    """A terminal that cannot keep up: each write waits until the test lets it go."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()

    def write(self, text):
        self.go.wait()
        return super().write(text)


def test_a_slow_terminal_never_holds_the_ingest_loop_and_a_storm_is_summarised():
    stream = SlowStream()
    printer = AlertPrinter(stream, max_queued=10)
    started = time.monotonic()
    for step in range(100):
        printer(alert(step))
    assert time.monotonic() - started < 1.0  # nothing waited on the stream
    stream.go.set()
    printer.close()
    lines = stream.getvalue().splitlines()
    printed = [line for line in lines if line.startswith("ALERT firing")]
    assert printed[0].startswith("ALERT firing   block    loss_not_finite  run=run-a step=0")
    (summary,) = [line for line in lines if "not printed" in line]
    assert int(summary.split()[2]) == 100 - len(printed)
    assert 10 <= len(printed) <= 12


def test_every_alert_is_printed_when_the_terminal_keeps_up():
    stream = io.StringIO()
    printer = AlertPrinter(stream)
    for step in range(50):
        printer(alert(step))
    printer.close()
    assert [line.split("step=")[1].split()[0] for line in stream.getvalue().splitlines()] == [str(s) for s in range(50)]
