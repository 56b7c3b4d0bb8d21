"""trainwire: event-streaming telemetry for LLM fine-tuning.

    import trainwire
    with trainwire.init(experiment="sft-llama", run_name="lr-2e-4", config={"lr": 2e-4}) as run:
        run.log_step(step, loss=loss, learning_rate=lr, grad_norm=gn, tokens_per_s=tps)
"""

from trainwire.producers import InvalidRunError, Run, TrainingStopped, init

__version__ = "0.1.0"
__all__ = ["InvalidRunError", "Run", "TrainingStopped", "init", "__version__"]
