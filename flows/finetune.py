"""The `finetune` flow: prepare data → train → evaluate → register → gate/promote.

Each arrow is a file or registry hand-off, so any stage can be re-run alone. A failure anywhere marks
the MLflow run FAILED and never moves `champion`; an interrupted training leaves its checkpoints and
its MLflow run open, and re-running the same config continues both: the same run, the same registered
version, each training step logged once.

One finetune per adapter name at a time (`tasks/locks.py`): a second one fails at once naming the
first, instead of sharing its MLflow run, checkpoint folder and registered version.

Many adapters share few devices (`tasks/device_slots.py`): after its name lock, a finetune holds one
slot of the Prefect global concurrency limit (`gpu`) and claims one of this machine's devices, which
becomes its `device` when the config says `auto`. The slot is taken here, where the training runs, so
every way of starting a finetune (the CLI, a retrain, a deployment on any worker) is bounded by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from lorafleet.config import FinetuneConfig, load_config, parse_config
from lorafleet.settings import Settings
from lorafleet.tasks import device_slots, locks, steps, tracking
from lorafleet.tasks.device_slots import SlotSettings
from lorafleet.tasks.merge import pin_parents
from lorafleet.tasks.train import training_key


def _config_from(config: str | Path | dict[str, Any] | FinetuneConfig) -> FinetuneConfig:
    if isinstance(config, FinetuneConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)


@flow(name="finetune")
def finetune(config: str | dict[str, Any], promote: bool = True) -> dict[str, Any]:
    """Fine-tune one adapter from a config file path (or an inline config dict).

    Returns a summary: run id, registered version, gate decision, headline metrics.
    """
    settings = Settings.from_env().ensure()
    slots = SlotSettings.from_env()
    spec = _config_from(config)
    if not promote:
        spec = spec.model_copy(update={"promotion": spec.promotion.model_copy(update={"auto_promote": False})})
    return run_finetune(spec, settings, slots)


def run_finetune(spec: FinetuneConfig, settings: Settings, slots: SlotSettings) -> dict[str, Any]:
    """The flow body, callable from other flows (retrain) with already-validated config and settings.

    Raises `locks.AlreadyRunning` when another process is fine-tuning the same name in this home. Waits
    for a slot of the global concurrency limit, then trains on the device claimed in it.
    """
    logger = get_run_logger()
    distributed = spec.training.distributed
    processes = distributed.num_processes if distributed.enabled else 1
    with locks.finetune_lock(settings.home, spec.name), \
            device_slots.device_slot(slots, spec.device, logger, count=processes) as devices:
        device = devices[0] if len(devices) == 1 else "cuda"
        if device != spec.device:
            logger.info("%s: training on %s", spec.name, ", ".join(devices))
            spec = spec.model_copy(update={"device": device})
        return _run_locked(spec, settings, devices)


def _run_locked(spec: FinetuneConfig, settings: Settings, devices: tuple[str, ...] = ()) -> dict[str, Any]:
    logger = get_run_logger()
    if spec.method == "merge":  # one resolution of the parents' aliases for the key and the merge alike
        spec = pin_parents(spec, settings)
    prepared = steps.prepare_data(spec, settings)
    if not prepared.path.exists():  # the Prefect cache points at a folder someone deleted
        prepared = steps.prepare_data.with_options(refresh_cache=True)(spec, settings)
    key = training_key(spec, prepared, settings)
    run_id = steps.start_tracking(spec, settings, prepared, key)
    client = tracking.mlflow_client(settings)
    try:
        trained = steps.train(spec, prepared, settings, key, run_id, devices)
        outcome = steps.evaluate(spec, prepared, trained, settings, run_id)
        version = steps.register(spec, prepared, trained, outcome, settings, run_id)
        gated = steps.gate(spec, prepared, version, outcome, settings, run_id)
    except KeyboardInterrupt:
        tracking.RunLogger(client, run_id).finish("KILLED")  # resumable: rerun the same config
        raise
    except BaseException:
        tracking.RunLogger(client, run_id).finish("FAILED")
        raise
    tracking.RunLogger(client, run_id).finish("FINISHED")
    summary = {
        "name": spec.name, "run_id": run_id, "version": version, "promoted": gated.promoted,
        "gate_reasons": gated.decision.reasons, "gate_provenance": gated.decision.provenance,
        "adapter_dir": str(trained.adapter_dir),
        "data_fingerprint": prepared.fingerprint, "prepared_dir": str(prepared.path),
        "n_test_examples": outcome.n_examples,
        "metrics": outcome.variants, "labels": outcome.labels,
        "train": {"steps": trained.steps, "best_val_loss": trained.best_val_loss,
                  "stopped_early": trained.stopped_early, "resumed_from_step": trained.resumed_from_step,
                  "seconds": trained.train_seconds},
    }
    logger.info("finetune %s done: version %s, %s", spec.name, version,
                "promoted to champion" if summary["promoted"] else "not promoted")
    return summary
