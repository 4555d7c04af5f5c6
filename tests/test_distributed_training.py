"""Data-parallel training on 2 CPU processes (gloo), started by the real `accelerate launch` / `torchrun`.

What is checked: 2 processes × 4 rows compute the updates of 1 process × 8 rows, with DDP and with FSDP
(sharded decoder layers, LoRA and QLoRA); FSDP with batches smaller than the world (a rank with no rows
still takes part in every forward pass); the finetune flow with `training.distributed` registers a working
adapter; a rank killed mid-run fails the run cleanly and a rerun resumes from the last checkpoint, at the
same or another world size and strategy. FSDP on 2 GPUs has its own `gpu` test.

Tolerance of the loss comparison: 1e-5 relative. The two runs see the same rows per optimizer step in the
same order, so they differ only in fp32 rounding: each rank pads its 4 rows to their own longest row
(other matmul shapes, other summation order), and the gradient is a sum of two partial sums instead of
one. Measured here over 40 steps: LoRA 1.9e-7 (DDP) and 3.0e-7 (FSDP), QLoRA 2.0e-7 and 1.5e-7. (QLoRA
was ~2e-5 until `keep_4bit_layout`: bitsandbytes had switched the 4-bit weights to its bf16 CPU kernels at
the first validation, on one side at other batch shapes than on the other.) Bugs move it more:
a gradient averaged instead of summed 2e-3 at step 4, no gradient all-reduce 4e-4 at step 3, every rank
training on the whole batch 1e-4 at step 11 (checked by mutating the code; see the report of issue 14).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Self

import pytest
import torch
import yaml
from mlflow import MlflowClient

from lorafleet.config import ConfigError, parse_config
from lorafleet.models.base import load_tokenizer, resolve_base_model
from lorafleet.models.checkpoints import list_checkpoints
from lorafleet.settings import Settings
from lorafleet.tasks import distributed
from lorafleet.tasks.data.prepare import prepare_dataset
from lorafleet.tasks.train import checkpoint_dir, train_from_config, training_key

from flow_helpers import copy_task_config, write_copy_task

LOSS_RTOL = 1e-5  # fp32 summation order only (see the module docstring)
READY_TIMEOUT_S = 600  # a loaded 2-core machine: generous, and only ever waited on while polling


def two_process_config(data: Path, *, launcher: str = "accelerate", steps: int = 12, **training) -> dict:
    # 60 steps teach the tiny model the JSON's shape (ROUGE-L) before its exact fields: gate on ROUGE-L
    raw = copy_task_config(data, steps=steps, promotion={"metric": "rouge_l"})
    raw["training"].update({"batch_size": 8, "eval_every": 5, "checkpoint_every": 5, "eval_examples": 16,
                            "distributed": {"launcher": launcher, "num_processes": 2}, **training})
    return raw


def single_process(raw: dict) -> dict:
    return {**raw, "training": {k: v for k, v in raw["training"].items() if k != "distributed"}}


def prepared_for(config, settings: Settings):
    tokenizer = load_tokenizer(resolve_base_model(config.base_model, settings.model_cache_dir))
    return prepare_dataset(config.data, tokenizer, name=config.name, out_root=settings.prepared_data_dir,
                           data_root=settings.data_root)


def home_at(path: Path, model_cache: Path) -> Settings:
    return Settings.for_home(path, model_cache_dir=model_cache).ensure()


def adapter_weights(folder: Path, file: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / file))


def assert_same_history(got: list[tuple[int, float]], expected: list[tuple[int, float]], rtol: float) -> None:
    """Per-step losses (train or validation) equal within `rtol` relative."""
    torch.testing.assert_close([loss for _, loss in got], [loss for _, loss in expected], rtol=rtol, atol=0)


def assert_same_weights(got: Path, expected: Path, rtol: float, file: str = "adapter_model.safetensors") -> None:
    """Every tensor of two adapters within `rtol` relative, per tensor, not per element: Adam divides by
    sqrt(v), so an element whose gradient is ~0 turns fp32 noise into a full-size step (1 element of 1536
    differed by 1.7e-4 relative in a measured run)."""
    reference = adapter_weights(expected, file)
    for name, tensor in adapter_weights(got, file).items():  # (an all-zero reference, e.g. an AdaLoRA projection
        # that kept no rank, must be matched exactly)
        assert float((tensor - reference[name]).norm()) <= rtol * float(reference[name].norm()), name


# ----- config and launch files (no processes) ------------------------------------------------------


@pytest.mark.parametrize("distributed_section, message", [
    ({"num_processes": 2}, r"training\.distributed: .*need a launcher"),
    ({"launcher": "accelerate", "num_processes": 0}, r"training\.distributed\.num_processes: .*greater than or equal to 1"),
    ({"launcher": "mpirun"}, r"training\.distributed\.launcher: "),
    ({"strategy": "fsdp"}, r"training\.distributed: .*need a launcher"),
])
def test_bad_distributed_sections_name_the_field(tmp_path, distributed_section, message):
    raw = copy_task_config(tmp_path / "x.jsonl")
    raw["training"]["distributed"] = distributed_section
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="c.yaml")


@pytest.mark.parametrize("method", ["turbo_lora", "turbo", "adalora"])
def test_fsdp_only_for_lora_and_qlora(tmp_path, method):
    raw = copy_task_config(tmp_path / "x.jsonl", method=method)
    raw["training"]["distributed"] = {"launcher": "accelerate", "num_processes": 2, "strategy": "fsdp"}
    with pytest.raises(ConfigError, match=rf"strategy 'fsdp' supports method lora or qlora.*not '{method}'"):
        parse_config(raw, source="c.yaml")


def test_fsdp_refuses_trainable_parameters_outside_the_decoder_layers(tiny_model):
    from lorafleet.models.lora import LoraSettings, apply_lora
    from lorafleet.models.sharding import decoder_layers, shard_decoder_layers

    model = apply_lora(tiny_model.model, LoraSettings(target_modules=["q_proj", "lm_head"]), quantized=False)
    assert len(decoder_layers(model)) == tiny_model.model.config.num_hidden_layers
    before = {name: type(p) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"strategy 'fsdp' shards the decoder layers only, but .*lm_head"):
        shard_decoder_layers(model, world_size=2, device_type="cpu")
    assert {name: type(p) for name, p in model.named_parameters()} == before  # refused before sharding anything


def test_the_default_is_one_process_and_the_training_key_ignores_the_world_size(tmp_path, settings):
    data = write_copy_task(tmp_path / "copy.jsonl", n=40)
    one = parse_config(single_process(two_process_config(data)))
    two = parse_config(two_process_config(data))
    assert not one.training.distributed.enabled and one.training.distributed.num_processes == 1
    prepared = prepared_for(one, settings)
    # the same global batches whatever the world size: a checkpoint of 2 processes resumes on 1
    assert training_key(one, prepared, settings) == training_key(two, prepared, settings)
    other_batch = parse_config({**one.model_dump(mode="json"),
                                "training": {**one.training.model_dump(mode="json"), "batch_size": 4}})
    assert training_key(other_batch, prepared, settings) != training_key(one, prepared, settings)


@pytest.mark.parametrize("device, storage", [("cuda", "bfloat16"), ("cpu", "float32")])
def test_fsdp_launches_like_ddp_and_packs_qlora_in_the_compute_dtype(tmp_path, device, storage):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = copy_task_config(tmp_path / "x.jsonl", method="qlora", device=device)
    raw["training"]["distributed"] = {"launcher": "accelerate", "num_processes": 2, "strategy": "fsdp"}
    config = parse_config(raw)
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(distributed.accelerate_config(config.training.distributed)))
    loaded = load_config_from_file(str(path))  # accelerate's own parser accepts every key
    # a plain multi-process launch: the worker shards the decoder layers itself (models/sharding.py)
    assert loaded.distributed_type == "MULTI_GPU" and loaded.num_processes == 2
    assert distributed.quant_storage_for(config) == storage  # = the compute dtype of models/base.py
    ddp = parse_config({**raw, "training": {**raw["training"], "distributed": {
        "launcher": "accelerate", "num_processes": 2}}})
    assert distributed.quant_storage_for(ddp) is None  # DDP replicates: uint8 4-bit storage is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_is_refused_before_launching_without_cuda(tmp_path):
    raw = two_process_config(tmp_path / "x.jsonl")
    raw["training"]["distributed"]["backend"] = "nccl"
    with pytest.raises(ValueError, match=r"training\.distributed: backend 'nccl' needs CUDA"):
        distributed.check_runnable(parse_config(raw))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP + QLoRA shards over 2 CUDA devices")
def test_fsdp_qlora_trains_on_two_gpus(tmp_path, model_cache):
    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    raw = {**two_process_config(data), "method": "qlora", "device": "cuda"}
    raw["training"]["distributed"]["strategy"] = "fsdp"
    config = parse_config(raw)
    settings = home_at(tmp_path / "home", model_cache)
    prepared = prepared_for(config, settings)
    trained = distributed.train_in_processes(config, prepared, settings, key=training_key(config, prepared, settings),
                                             run_id=None, on_line=lambda _: None)
    assert trained.steps == 12 and trained.best_val_loss is not None
    assert (trained.adapter_dir / "adapter_model.safetensors").exists()  # full state dict, gathered on rank 0


# ----- real launchers, 2 CPU processes ------------------------------------------------------------


class StepRecorder:
    def __init__(self) -> None:
        self.grad_norms: list[float] = []

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        self.grad_norms.append(metrics["train/grad_norm"])

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        pass


# Turbo LoRA adds heads (their own parameters and loss terms); Turbo trains heads alone on rows that rank 0
# distils once for all ranks; QLoRA trains LoRA on a 4-bit base (bitsandbytes' CPU kernels here). FSDP shards
# the decoder layers (the 4-bit ones too, packed in fp32 on CPU) instead of replicating them.
METHODS = {"lora": {}, "turbo_lora": {"turbo": {"num_heads": 2}},
           "turbo": {"turbo": {"num_heads": 2, "distill_examples": 48, "distill_max_new_tokens": 24}},
           "qlora": {},
           # AdaLoRA's allocator masks ranks by the gradients: every rank sees the summed ones, so they agree
           "adalora": {"adalora": {"init_r": 4, "target_r": 2}}}
STRATEGIES = [(method, "ddp") for method in METHODS] + [("lora", "fsdp"), ("qlora", "fsdp")]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("method, strategy", STRATEGIES)
def test_two_processes_of_batch_4_match_one_process_of_batch_8(tmp_path, model_cache, empty_cwd, method, strategy):
    from lorafleet.tasks import tracking

    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    raw = {**two_process_config(data), "method": method, **METHODS[method]}
    raw["training"]["distributed"]["strategy"] = strategy
    two = parse_config(raw)
    one = parse_config(single_process(raw))
    alone, shared = home_at(tmp_path / "one", model_cache), home_at(tmp_path / "two", model_cache)
    prepared = prepared_for(one, alone)
    key = training_key(one, prepared, alone)
    client = tracking.mlflow_client(shared)
    run_id = tracking.start_run(client, tracking.ensure_experiment(client, two.name, shared), run_name="ddp")

    recorder = StepRecorder()
    expected = train_from_config(one, prepared, alone, key=key, progress=False, callbacks=[recorder])
    lines: list[str] = []
    got = distributed.train_in_processes(two, prepared, shared, key=key, run_id=run_id, on_line=lines.append)

    assert [s for s, _ in got.train_history] == list(range(1, 13))
    rtol = LOSS_RTOL
    assert_same_history(got.train_history, expected.train_history, rtol)
    # Adam and clipping hide a gradient's scale from the loss (a gradient averaged over ranks instead of
    # summed trains alike): rank 0's logged grad norms pin the scale down. Each step is logged once.
    logged = sorted(client.get_metric_history(run_id, "train/grad_norm"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, 13))
    torch.testing.assert_close([m.value for m in logged], recorder.grad_norms, rtol=10 * rtol, atol=0)
    assert_same_history(got.val_history, expected.val_history, rtol)
    assert got.tokens_seen == expected.tokens_seen and got.steps == 12
    weights_file = "turbo_heads.safetensors" if method == "turbo" else "adapter_model.safetensors"
    assert_same_weights(got.adapter_dir, expected.adapter_dir, 10 * rtol, weights_file)
    # rank 0 alone reported progress, from a process group of 2; the pid files went with the ranks
    assert sum(line.startswith("step 5: validation loss") for line in lines) == 1
    assert any(line.endswith("after 12 steps on 2 processes") for line in lines), lines[-5:]
    folder = distributed.run_dir(two, key, shared)
    assert list(folder.glob("rank-*.pid")) == []
    assert yaml.safe_load((folder / distributed.ACCELERATE_CONFIG_FILE).read_text())["num_processes"] == 2


@pytest.mark.timeout(1200)
def test_fsdp_ranks_without_rows_still_take_part_in_every_pass(tmp_path, model_cache):
    """A 1-row batch leaves rank 1 without rows, and 3 validation chunks give rank 1 one fewer: under FSDP
    each forward all-gathers the layers on every rank, so a rank that skipped its pass would hang the run.
    The idle rank runs a pass that counts for nothing: the losses stay those of one process."""
    from lorafleet.models.batching import length_grouped_batches

    data = write_copy_task(tmp_path / "copy.jsonl", n=80)
    raw = two_process_config(data, steps=22, batch_size=3, eval_every=11, checkpoint_every=11)
    raw["training"]["distributed"]["strategy"] = "fsdp"
    two, one = parse_config(raw), parse_config(single_process(raw))
    alone, shared = home_at(tmp_path / "one", model_cache), home_at(tmp_path / "two", model_cache)
    prepared = prepared_for(one, alone)
    key = training_key(one, prepared, alone)
    train_rows = prepared.load_split("train").to_list()
    order = length_grouped_batches([len(r["input_ids"]) for r in train_rows], 3, seed=one.training.seed, epoch=0)
    assert len(order) == 22 and min(len(b) for b in order) == 1  # one step on a batch of 1 row
    assert -(-min(len(prepared.load_split("validation")), 16) // 3) == 3  # validation: 3 chunks on 2 ranks

    expected = train_from_config(one, prepared, alone, key=key, progress=False)
    got = distributed.train_in_processes(two, prepared, shared, key=key, run_id=None, on_line=lambda _: None)
    assert_same_history(got.train_history, expected.train_history, 1e-5)
    assert_same_history(got.val_history, expected.val_history, 1e-5)


class RankKiller:
    """SIGKILLs rank 1 of the launch running under `root` (an adapter's checkpoint folder, any key) once it
    has written the checkpoint of step `after_step`. Rank pid files exist only while their launch runs."""

    def __init__(self, root: Path, after_step: int) -> None:
        self.root, self.after_step = root, after_step
        self.killed_pid: int | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.stop = threading.Event()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _watch(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            for pid_file in self.root.glob(f"*/{distributed.RUN_SUBDIR}/rank-1.pid"):
                run = pid_file.parent.parent
                if any(step_of(p) >= self.after_step for p in list_checkpoints(run)):
                    self.killed_pid = int(pid_file.read_text())
                    os.kill(self.killed_pid, signal.SIGKILL)
                    return
            time.sleep(0.02)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("launcher, strategy", [("torchrun", "ddp"), ("accelerate", "fsdp")])
def test_killed_rank_fails_cleanly_and_resumes_on_one_process(tmp_path, model_cache, launcher, strategy):
    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    raw = two_process_config(data, launcher=launcher, steps=60)
    raw["training"]["distributed"]["strategy"] = strategy
    two = parse_config(raw)
    settings = home_at(tmp_path / "home", model_cache)
    prepared = prepared_for(two, settings)
    key = training_key(two, prepared, settings)
    checkpoints = checkpoint_dir(two, key, settings)

    failure = rf"{launcher}, 2 processes\) failed.*no adapter was written; rerunning the same config resumes from step-"
    with RankKiller(checkpoints.parent, after_step=5) as killer, pytest.raises(distributed.DistributedTrainingError,
                                                                                match=failure):
        distributed.train_in_processes(two, prepared, settings, key=key, run_id=None, on_line=lambda _: None)
    assert killer.killed_pid is not None
    assert not (checkpoints / "DONE").exists()
    assert not (settings.adapters_dir / two.name).exists() or not any((settings.adapters_dir / two.name).iterdir())
    last = step_of(list_checkpoints(checkpoints)[-1])
    assert 5 <= last < 60

    one = parse_config(single_process(two_process_config(data, steps=60)))
    resumed = train_from_config(one, prepared, settings, key=key, progress=False)
    assert resumed.resumed_from_step == last and resumed.steps == 60
    assert [s for s, _ in resumed.train_history] == list(range(1, 61))  # the history the checkpoint carried on
    # the checkpoint (whole tensors, optimizer state included) continues as if one process had run throughout
    alone = home_at(tmp_path / "alone", model_cache)
    uninterrupted = train_from_config(one, prepared_for(one, alone), alone, key=key, progress=False)
    assert_same_history(resumed.train_history, uninterrupted.train_history, 1e-4)
    assert_same_weights(resumed.adapter_dir, uninterrupted.adapter_dir, 1e-3)


class StopAt:
    """Interrupts a one-process run after step `step` (a checkpoint of step 5 exists by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise KeyboardInterrupt("simulated kill")

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        pass


@pytest.mark.timeout(1200)
def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(tmp_path, model_cache):
    """The other direction: whole tensors written by one process are sliced into each rank's shards,
    the optimizer state included, and the run goes on as if it had never stopped."""
    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    raw = two_process_config(data, steps=12)
    raw["training"]["distributed"]["strategy"] = "fsdp"
    two, one = parse_config(raw), parse_config(single_process(raw))
    settings, alone = home_at(tmp_path / "home", model_cache), home_at(tmp_path / "alone", model_cache)
    prepared = prepared_for(one, settings)
    key = training_key(one, prepared, settings)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(one, prepared, settings, key=key, progress=False, callbacks=[StopAt(7)])
    assert [step_of(p) for p in list_checkpoints(checkpoint_dir(one, key, settings))] == [5]

    resumed = distributed.train_in_processes(two, prepared, settings, key=key, run_id=None, on_line=lambda _: None)
    uninterrupted = train_from_config(one, prepared_for(one, alone), alone, key=key, progress=False)
    assert resumed.resumed_from_step == 5 and resumed.steps == 12
    assert_same_history(resumed.train_history, uninterrupted.train_history, 1e-5)
    assert_same_weights(resumed.adapter_dir, uninterrupted.adapter_dir, 1e-4)


# ----- the finetune flow with `training.distributed` ------------------------------------------------


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.timeout(1800)
def test_finetune_on_two_processes_registers_and_a_killed_rank_leaves_the_champion(home, tmp_path):
    from lorafleet.flows.finetune import finetune

    client = MlflowClient(tracking_uri=home.tracking_uri, registry_uri=home.tracking_uri)
    data = write_copy_task(tmp_path / "copy.jsonl")
    first_config = two_process_config(data, steps=60, batch_size=16, eval_every=20, checkpoint_every=20)
    first = finetune(config=first_config)
    assert first["promoted"], first["gate_reasons"]
    assert first["metrics"]["adapter"]["rouge_l"] > first["metrics"]["base"]["rouge_l"]
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(first["run_id"], "train/loss")) == 60  # rank 0 only, once per step
    assert client.get_run(first["run_id"]).data.params["config.training.distributed.num_processes"] == "2"

    # another config (another key), one rank killed after its step-5 checkpoint: nothing half-done survives
    second_config = two_process_config(data, steps=60, batch_size=16, learning_rate=5e-3, eval_every=20)
    with RankKiller(home.checkpoints_dir / "copy", after_step=5) as killer, \
            pytest.raises(distributed.DistributedTrainingError, match=r"accelerate, 2 processes\) failed"):
        finetune(config=second_config)
    assert killer.killed_pid is not None
    assert {a: str(v) for a, v in client.get_registered_model("copy").aliases.items()} == {
        "champion": "1", "challenger": "1"}
    assert [v.version for v in client.search_model_versions("name='copy'")] in (["1"], [1])
    runs = client.search_runs([client.get_run(first["run_id"]).info.experiment_id],
                              order_by=["attributes.start_time DESC"])
    killed_run = runs[0]
    assert killed_run.info.run_id != first["run_id"] and killed_run.info.status == "FAILED"
    assert sorted(p.name for p in (home.adapters_dir / "copy").iterdir()) == [Path(first["adapter_dir"]).name]

    # the rerun continues the same MLflow run from the last checkpoint, and logs each step once
    second = finetune(config=second_config)
    assert second["run_id"] == killed_run.info.run_id
    assert second["train"]["resumed_from_step"] is not None and 5 <= second["train"]["resumed_from_step"] < 60
    assert second["version"] == "2"
    history = client.get_metric_history(second["run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 61))
