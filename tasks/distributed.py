"""Training on several processes: hand the training stage to `accelerate launch` or `torchrun`.

lorafleet does not distribute anything itself. The flow's process writes everything the ranks need
into files (a spec JSON and, for Accelerate, an accelerate config YAML in the run's checkpoint
folder), starts the launcher as a subprocess, forwards its output line by line, and reads back the
result rank 0 wrote (`tasks/distributed_worker.py`). A failed or killed rank makes the launcher stop
the others and exit non-zero: the stage then raises `DistributedTrainingError`, no adapter has been
written, and rerunning the same config resumes from the last checkpoint, at any world size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config import FinetuneConfig
from lorafleet.models.cache import atomic_write_text
from lorafleet.models.checkpoints import list_checkpoints
from lorafleet.models.training_settings import DistributedSettings
from lorafleet.processes import stop_process_group
from lorafleet.settings import Settings
from lorafleet.tasks.data.prepare import PreparedData
from lorafleet.tasks.train import TrainedAdapter, checkpoint_dir

WORKER_MODULE = "lorafleet.tasks.distributed_worker"
RUN_SUBDIR = "distributed"  # inside the run's checkpoint folder: spec, accelerate config, result, pids, log
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
LOG_FILE = "worker.log"
OUTPUT_TAIL_LINES = 40  # worker output quoted in the error of a failed run
STOP_GRACE_SECONDS = 30  # after SIGTERM to the launcher's process group, before SIGKILL


class DistributedTrainingError(RuntimeError):
    """The launcher or one of its ranks failed; the message says how and quotes the output's end."""


def run_dir(config: FinetuneConfig, key: str, settings: Settings) -> Path:
    """Where the launch files of a training run live: next to (inside) its checkpoints."""
    return checkpoint_dir(config, key, settings) / RUN_SUBDIR


def uses_cuda(config: FinetuneConfig) -> bool:
    import torch

    return config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())


def check_runnable(config: FinetuneConfig) -> None:
    """What the config file cannot know: whether this machine has the CUDA devices asked for."""
    import torch

    dist = config.training.distributed
    cuda = uses_cuda(config)
    if not cuda and dist.backend == "nccl":
        raise ValueError("training.distributed: backend 'nccl' needs CUDA, and this machine has no CUDA device")
    if cuda and dist.num_processes > torch.cuda.device_count():
        raise ValueError(f"training.distributed.num_processes is {dist.num_processes} but this machine has "
                         f"{torch.cuda.device_count()} CUDA devices (one process per GPU)")


def accelerate_config(dist: DistributedSettings) -> dict[str, Any]:
    """The accelerate config file `accelerate launch --config_file` gets for this run.

    Both strategies use Accelerate's torchrun-based multi-process launcher (`MULTI_GPU`); on a CPU-only
    machine the ranks then ask for the gloo backend themselves (`distributed_worker`), which is how
    Accelerate runs several CPU processes without MPI. Accelerate's own `FSDP` type would only tell
    `Accelerator.prepare` to shard the whole model, which the worker does not call: it shards the decoder
    layers itself (`models/sharding.py`, why there). Mixed precision stays 'no': the loop autocasts itself.
    """
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": "no",
        "num_machines": 1,
        "num_processes": dist.num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    return config


def quant_storage_for(config: FinetuneConfig) -> str | None:
    """FSDP + QLoRA needs the 4-bit weights packed in the compute dtype (PEFT, bitsandbytes docs):
    FSDP shards float tensors only. That dtype is bf16 on CUDA and fp32 on CPU (`models/base.py`)."""
    if config.training.distributed.strategy == "fsdp" and config.method == "qlora":
        return "bfloat16" if uses_cuda(config) else "float32"
    return None


def launch_command(dist: DistributedSettings, folder: Path, spec_path: Path, *, port: int) -> list[str]:
    """The launcher invocation, run with this interpreter so the ranks import this installation."""
    if dist.launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(folder / ACCELERATE_CONFIG_FILE),
                "--num_processes", str(dist.num_processes), "--main_process_port", str(port),
                "-m", WORKER_MODULE, str(spec_path)]
    if dist.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", str(dist.num_processes), "--master-addr", "127.0.0.1",
                "--master-port", str(port), "--module", WORKER_MODULE, str(spec_path)]
    raise ValueError(f"training.distributed.launcher {dist.launcher!r} launches nothing")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_launch_files(config: FinetuneConfig, prepared: PreparedData, settings: Settings, *, key: str,
                       run_id: str | None) -> Path:
    """Spec (and accelerate config) for the ranks; stale results, pid files and logs are removed."""
    folder = run_dir(config, key, settings)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / RESULT_FILE, folder / LOG_FILE, *folder.glob("rank-*.pid")]:
        stale.unlink(missing_ok=True)
    spec = {
        "config": config.model_dump(mode="json"),
        "prepared_dir": str(prepared.path),
        "settings": {name: str(value) for name, value in asdict(settings).items()},
        "key": key,
        "run_id": run_id,
        "run_dir": str(folder),
        "quant_storage": quant_storage_for(config),
    }
    atomic_write_text(folder / SPEC_FILE, json.dumps(spec, indent=1))
    if config.training.distributed.launcher == "accelerate":
        atomic_write_text(folder / ACCELERATE_CONFIG_FILE,
                          yaml.safe_dump(accelerate_config(config.training.distributed),
                                         sort_keys=False))
    return folder


def launch_environment(devices: tuple[str, ...], environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment: with CUDA devices claimed for the ranks (`cuda:2`, `cuda:5`), only
    those are visible, so rank k's `cuda:k` is the k-th claimed device."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    indices = [device.split(":", 1)[1] for device in devices if device.startswith("cuda:")]
    if indices:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible:  # already narrowed: cuda:N is the N-th of those
            listed = [part.strip() for part in visible.split(",")]
            indices = [listed[int(index)] for index in indices]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(indices)
    return env


def train_in_processes(config: FinetuneConfig, prepared: PreparedData, settings: Settings, *, key: str,
                       run_id: str | None, on_line: Callable[[str], None] = print,
                       devices: tuple[str, ...] = ()) -> TrainedAdapter:
    """Run the training stage on `training.distributed.num_processes` ranks and wait for it.

    Every line the launcher and its ranks print goes to `on_line` and to `worker.log` in the run folder.
    `devices` are the CUDA devices claimed for the ranks (`tasks/device_slots.py`); none: all visible.
    """
    check_runnable(config)
    dist = config.training.distributed
    folder = write_launch_files(config, prepared, settings, key=key, run_id=run_id)
    command = launch_command(dist, folder, folder / SPEC_FILE, port=free_port())
    env = launch_environment(devices, os.environ)
    on_line(f"launching {dist.num_processes} training processes"
            f"{' on ' + ', '.join(devices) if devices else ''}: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with open(folder / LOG_FILE, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=env, start_new_session=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                log_file.write(line + "\n")
                log_file.flush()
                tail.append(line)
                on_line(line)
            code = process.wait()
        except BaseException:
            stop_process_group(process, grace=STOP_GRACE_SECONDS)
            raise
        finally:
            for pid_file in folder.glob("rank-*.pid"):  # only a live run's ranks are named there
                pid_file.unlink(missing_ok=True)
    result = folder / RESULT_FILE
    if code != 0 or not result.exists():
        checkpoints = list_checkpoints(checkpoint_dir(config, key, settings))
        resume = (f"rerunning the same config resumes from {checkpoints[-1].name}" if checkpoints
                  else "no checkpoint was written yet; a rerun starts from step 0")
        raise DistributedTrainingError(
            f"distributed training ({dist.launcher}, {dist.num_processes} processes) failed with exit code {code}"
            f"{'' if code != 0 else ' but wrote no result'}; no adapter was written; {resume}. "
            f"Full output: {folder / LOG_FILE}. Last lines:\n" + "\n".join(tail))
    return trained_from_json(result.read_text(encoding="utf-8"))


def trained_to_json(trained: TrainedAdapter) -> str:
    raw = asdict(trained)
    raw["adapter_dir"] = str(trained.adapter_dir)
    return json.dumps(raw, indent=1)


def trained_from_json(text: str) -> TrainedAdapter:
    raw = json.loads(text)
    raw["adapter_dir"] = Path(raw["adapter_dir"])
    raw["train_history"] = [tuple(item) for item in raw["train_history"]]
    raw["val_history"] = [tuple(item) for item in raw["val_history"]]
    return TrainedAdapter(**raw)
