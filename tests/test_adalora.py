"""AdaLoRA (`method: adalora`, models/adalora.py) on the tiny random Llama: config, training to the rank
budget, an exact conversion to plain LoRA that stock PEFT and the engine serve, exact resume, and a
finetune flow that registers the rank pattern. PEFT's own AdaLoRA model is the oracle throughout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_training import Recorder, make_rows

from lorafleet.config import ConfigError, parse_config
from lorafleet.models.adalora import (
    AdaLoraAllocation,
    OrthRegularized,
    apply_adalora,
    kept_ranks,
    to_plain_lora,
)
from lorafleet.models.adalora_settings import AdaLoraSettings
from lorafleet.models.adapter_dir import (
    AdapterManifest,
    BaseModelRef,
    InvalidAdapterDir,
    TaskInfo,
    read_manifest,
    validate_adapter_dir,
    write_manifest,
)
from lorafleet.models.batching import collate
from lorafleet.models.lora import LoraSettings, save_adapter
from lorafleet.models.loss import CompletionObjective
from lorafleet.models.training import train_adapter
from lorafleet.models.training_settings import TrainingSettings

from flow_helpers import ALL_LINEAR, copy_task_config, write_copy_task

ADALORA = AdaLoraSettings(init_r=6, target_r=2, tinit=0.1, tfinal=0.3)
LORA = LoraSettings(alpha=16, target_modules=tuple(ALL_LINEAR))
STEPS = 20
# thread_tuning off: the tuner's thread-count trials fall on other steps in a resumed run, and a step on
# another thread count rounds AdaLoRA's small reductions differently (the resume test compares bit for bit)
TRAINING = TrainingSettings(max_steps=STEPS, batch_size=8, learning_rate=1e-2, eval_every=5, checkpoint_every=5,
                            precision="fp32", early_stopping_patience=None, seed=3, thread_tuning=False)


def fresh_adalora(model_cache, settings: AdaLoraSettings = ADALORA, total_steps: int = STEPS):
    from lorafleet.models.base import load_base_model

    loaded = load_base_model("tiny-random-llama", model_cache)
    torch.manual_seed(0)
    model = apply_adalora(loaded.model, LORA, settings, total_steps=total_steps)
    return model, AdaLoraAllocation(model, settings, total_steps), loaded.tokenizer


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----- config ------------------------------------------------------------------------------------------


def test_method_adalora_gets_the_section_defaults_and_other_methods_refuse_it():
    config = parse_config({"name": "a", "data": {"preset": "viggo"}, "method": "adalora"})
    assert config.adalora == AdaLoraSettings()
    assert (config.adalora.init_r, config.adalora.target_r) == (12, 8)
    assert parse_config({"name": "a", "data": {"preset": "viggo"}}).adalora is None
    # a config round-trips through its dump (the manifest's training_config is read back this way)
    assert parse_config(config.model_dump(mode="json")) == config
    with pytest.raises(ConfigError, match="`adalora` section only applies to method 'adalora', not 'lora'"):
        parse_config({"name": "a", "data": {"preset": "viggo"}, "adalora": {"target_r": 4}}, source="c.yaml")


@pytest.mark.parametrize("section, message", [
    ({"target_r": 12}, r"c\.yaml: adalora: .*adalora\.target_r \(12\) must be below adalora\.init_r \(12\)"),
    ({"tinit": 0.5, "tfinal": 0.5}, r"c\.yaml: adalora: .*adalora\.tinit \+ adalora\.tfinal"),
    ({"beta1": 1.0}, r"c\.yaml: adalora\.beta1: "),
    ({"deltaT": 0}, r"c\.yaml: adalora\.deltaT: "),
    ({"orth_reg_weight": -1}, r"c\.yaml: adalora\.orth_reg_weight: "),
    ({"rank": 4}, r"c\.yaml: adalora\.rank: unknown field"),
])
def test_bad_adalora_fields_are_named(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"name": "a", "data": {"preset": "viggo"}, "method": "adalora", "adalora": section},
                     source="c.yaml")


def test_fsdp_is_refused_for_adalora():
    with pytest.raises(ConfigError, match="strategy 'fsdp' supports method lora or qlora.*not 'adalora'"):
        parse_config({"name": "a", "data": {"preset": "viggo"}, "method": "adalora", "training": {
            "distributed": {"launcher": "torchrun", "num_processes": 2, "strategy": "fsdp"}}})


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 99, 1000])
def test_the_schedule_always_leaves_an_allocation_phase(total):
    for tinit, tfinal in ((0.0, 0.0), (0.1, 0.2), (0.45, 0.5), (0.0, 0.99), (0.99, 0.0)):
        start, final = AdaLoraSettings(tinit=tinit, tfinal=tfinal).phase_steps(total)
        assert 0 <= start < total - final <= total  # PEFT's AdaLoraConfig check, which would raise otherwise


# ----- training, conversion, serving ---------------------------------------------------------------------


def test_orthogonal_penalty_equals_the_one_peft_adds_to_its_own_loss(model_cache):
    model, allocation, tokenizer = fresh_adalora(model_cache)
    batch = collate(make_rows(tokenizer, 4, seed=0), tokenizer.pad_token_id)
    objective = allocation.objective(CompletionObjective(model))
    assert isinstance(objective, OrthRegularized)
    ours = objective(batch)
    peft_loss = model(**batch).loss  # AdaLoraModel.forward: CE + orth_reg_weight * penalty
    torch.testing.assert_close(ours.loss, peft_loss, rtol=1e-5, atol=1e-5)
    plain = CompletionObjective(model)(batch).loss
    assert float((ours.loss - plain).detach()) > 0.1  # the penalty is really there (random A, B are far from orthogonal)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step AdaLoRA run (init_r 6 → target_r 2 on 14 projections), its log and the saved adapter folder."""
    from lorafleet.models.base import load_base_model
    from lorafleet.settings import Settings

    model_cache = Settings.from_env().model_cache_dir
    folder = tmp_path_factory.mktemp("adalora")
    model, allocation, tokenizer = fresh_adalora(model_cache)
    steps = []

    class Log(Recorder):
        def on_train_step(self, step, metrics):
            steps.append(metrics)

    recorder = Log()
    result = train_adapter(model, make_rows(tokenizer, 120, seed=0), make_rows(tokenizer, 16, seed=1), TRAINING,
                           checkpoint_dir=folder / "ckpt", pad_token_id=tokenizer.pad_token_id,
                           callbacks=[recorder], progress=False, allocation=allocation)
    model.eval()
    plain = to_plain_lora(model)
    loaded = load_base_model("tiny-random-llama", model_cache)
    manifest = AdapterManifest(name="ada", method="adalora", base_model=BaseModelRef(id="tiny-random-llama",
                                                                                    revision=loaded.resolved.revision),
                               tokenizer_hash="x", task=TaskInfo(name="ada"), rank_pattern=plain.rank_pattern)
    adapter_dir = save_adapter(None, folder / "adapter", manifest, lora_files=plain.save)
    return {"model": model, "plain": plain, "result": result, "steps": steps, "validations": recorder.validations,
            "dir": adapter_dir, "tokenizer": tokenizer}


def test_training_allocates_ranks_unevenly_within_the_budget(trained):
    pattern = kept_ranks(trained["model"])
    assert len(pattern) == 14 and pattern == trained["plain"].rank_pattern
    assert sum(pattern.values()) <= ADALORA.target_r * len(pattern)  # the budget is reached
    assert len(set(pattern.values())) > 1  # and shared unevenly
    assert max(pattern.values()) <= ADALORA.init_r
    budgets = [m["adalora/budget"] for m in trained["steps"]]
    assert budgets[0] == ADALORA.init_r * 14 and budgets[-1] == ADALORA.target_r * 14
    assert budgets == sorted(budgets, reverse=True)
    assert all("train/orth_reg" in m for m in trained["steps"])
    # only validations once the pattern is final (step 14 = 20 - floor(0.3 * 20)) may give the best weights
    assert trained["result"].state.best_step >= 14
    assert [step for step, _ in trained["validations"]] == [5, 10, 15, 20]


def test_the_plain_lora_folder_gives_peft_adaloras_logits_in_stock_peft(trained, model_cache):
    from peft import PeftModel

    from lorafleet.models.base import load_base_model

    folder, plain = trained["dir"], trained["plain"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == plain.rank == max(plain.rank_pattern.values())
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert read_manifest(folder).rank_pattern == plain.rank_pattern
    loaded = load_base_model("tiny-random-llama", model_cache)
    served = PeftModel.from_pretrained(loaded.model, str(folder)).eval()
    ids = torch.tensor([list(range(5, 45)), list(range(60, 100))])
    with torch.no_grad():
        expected = trained["model"](input_ids=ids).logits
        got = served(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with served.disable_adapter(), torch.no_grad():
        base = served(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter does change the model


def test_the_engine_serves_the_converted_adapter_with_peft_adaloras_greedy_tokens(trained, model_cache):
    from lorafleet.evaluation.engine_generation import EngineScorer
    from lorafleet.evaluation.generation import generate_texts
    from lorafleet.models.base import load_base_model
    from lorafleet.models.lora_weights import read_peft_adapter
    from lorafleet.models.sampling_rules import eos_token_ids

    tokenizer = trained["tokenizer"]
    prompts = [row["input_ids"][:12] for row in make_rows(tokenizer, 6, seed=5)]
    expected = generate_texts(trained["model"], tokenizer, prompts, max_new_tokens=16, batch_size=3, progress=False)
    loaded = load_base_model("tiny-random-llama", model_cache)
    weights = read_peft_adapter(trained["dir"], _shape(loaded.model))
    assert weights.rank == trained["plain"].rank
    with EngineScorer(loaded.model, tokenizer, trained["dir"],
                      eos_token_ids=eos_token_ids(loaded.model, tokenizer, required=True)) as scorer:
        got = scorer.generate(prompts, max_new_tokens=16, adapter=True, progress=False)
        base = scorer.generate(prompts, max_new_tokens=16, adapter=False, progress=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.token_ids for r in got] != [r.token_ids for r in base]


def _shape(hf_model):
    from lorafleet.models.lora_weights import ProjectionShape

    return ProjectionShape.from_hf_config(hf_model.config)


def test_conversion_is_exact_for_a_pattern_with_empty_modules(model_cache, tmp_path):
    """Hand-made masks: a module with no rank left is written as zeros and changes nothing."""
    from peft import PeftModel

    from lorafleet.models.base import load_base_model

    model, _, _ = fresh_adalora(model_cache)
    with torch.no_grad():
        for index, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if "lora_E" in n):
            p.copy_(torch.randn_like(p))
            p[: index % 7] = 0.0  # module i keeps 6 - (i % 7) ranks: 6 down to 0
    plain = to_plain_lora(model)
    assert sorted(set(plain.rank_pattern.values())) == [0, 1, 2, 3, 4, 5, 6] and plain.rank == 6
    assert plain.kept_params == sum(k * (a + b) for k, (a, b) in zip(
        plain.rank_pattern.values(), _dims(model, plain.rank_pattern)))
    plain.save(tmp_path)
    loaded = load_base_model("tiny-random-llama", model_cache)
    served = PeftModel.from_pretrained(loaded.model, str(tmp_path)).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def _dims(model, pattern):
    modules = dict(model.named_modules())
    for name in pattern:
        layer = modules[f"base_model.model.{name}"].get_base_layer()
        yield layer.in_features, layer.out_features


def test_an_adalora_adapter_folder_needs_its_peft_files(tmp_path):
    manifest = AdapterManifest(name="ada", method="adalora", base_model=BaseModelRef(id="b", revision="r"),
                               tokenizer_hash="x", task=TaskInfo(name="ada"), rank_pattern={"model.layers.0.q": 3})
    write_manifest(tmp_path, manifest)
    with pytest.raises(InvalidAdapterDir, match=r"\(adalora\) is missing adapter_config.json"):
        validate_adapter_dir(tmp_path)
    with pytest.raises(ValueError, match="rank_pattern"):
        AdapterManifest.model_validate({**manifest.model_dump(), "rank_pattern": {"m": -1}})


def test_a_killed_adalora_run_resumes_to_identical_weights_and_rank_pattern(model_cache, tmp_path):
    """Killed at step 12, inside the allocation phase (after the step-10 checkpoint): the importance scores
    and the rank pattern come back from the checkpoint, so the rerun ends where a straight run does."""
    model, allocation, tokenizer = fresh_adalora(model_cache)
    train, val = make_rows(tokenizer, 120, seed=0), make_rows(tokenizer, 16, seed=1)
    train_adapter(model, train, val, TRAINING, checkpoint_dir=tmp_path / "straight",
                  pad_token_id=tokenizer.pad_token_id, progress=False, allocation=allocation)
    expected, expected_pattern = adapter_weights(model), kept_ranks(model)

    model, allocation, _ = fresh_adalora(model_cache)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, train, val, TRAINING, checkpoint_dir=tmp_path / "killed",
                      pad_token_id=tokenizer.pad_token_id, callbacks=[Recorder(stop_at=12)], progress=False,
                      allocation=allocation)
    model, allocation, _ = fresh_adalora(model_cache)
    result = train_adapter(model, train, val, TRAINING, checkpoint_dir=tmp_path / "killed",
                           pad_token_id=tokenizer.pad_token_id, progress=False, allocation=allocation)
    assert result.resumed_from_step == 10
    assert kept_ranks(model) == expected_pattern
    for name, tensor in adapter_weights(model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_rank_pattern_heatmap_and_summary():
    from lorafleet.evaluation.report import describe_rank_pattern, plot_rank_pattern, rank_grid

    pattern = {f"model.layers.{i}.self_attn.{m}": i + j for i in range(3) for j, m in enumerate(("v_proj", "q_proj"))}
    layers, modules, grid = rank_grid(pattern)
    assert layers == ["0", "1", "2"] and modules == ["q_proj", "v_proj"]  # a Llama block's order
    assert grid == [[1, 0], [2, 1], [3, 2]]
    assert plot_rank_pattern(pattern, max_rank=6).axes
    line = describe_rank_pattern(pattern, budget=12)
    assert "total rank 9 of a budget of 12 over 6 projections" in line and "q_proj 2.0" in line and "2: 5" in line


# ----- the finetune flow -------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_api")
def test_finetune_flow_registers_an_adalora_adapter_with_its_rank_pattern(home, tmp_path):
    from mlflow import MlflowClient

    from lorafleet.flows.finetune import finetune

    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    config = copy_task_config(data, name="ada", steps=30, method="adalora",
                              adalora={"init_r": 6, "target_r": 3})
    del config["lora"]["r"]  # not used by AdaLoRA
    config["evaluation"]["max_examples"] = 8
    outcome = finetune(config=config)
    manifest = read_manifest(outcome["adapter_dir"])
    assert manifest.method == "adalora" and manifest.training_config["adalora"]["target_r"] == 3
    pattern = manifest.rank_pattern
    assert len(pattern) == 14 and sum(pattern.values()) <= 3 * 14 and len(set(pattern.values())) > 1
    client = MlflowClient(tracking_uri=home.tracking_uri, registry_uri=home.tracking_uri)
    version = client.get_model_version("ada", outcome["version"])
    assert version.tags["method"] == "adalora"
    plots = {f.path for f in client.list_artifacts(outcome["run_id"], "plots")}
    assert "plots/rank_pattern.png" in plots
    logged = client.download_artifacts(outcome["run_id"], "adalora/rank_pattern.json", str(tmp_path / "got"))
    assert json.loads(Path(logged).read_text()) == pattern
    run = client.get_run(outcome["run_id"])
    assert run.data.metrics["adalora/final_total_rank"] == sum(pattern.values())


def test_to_plain_lora_refuses_a_model_without_adalora_layers(tiny_model):
    with pytest.raises(ValueError, match="no trainable AdaLoRA adapter"):
        to_plain_lora(copy.deepcopy(tiny_model.model))


# ----- `lorafleet bench adalora` -----------------------------------------------------------------------


def test_bench_adalora_compares_lora_at_the_same_rank_budget(tmp_path, home):
    from typer.testing import CliRunner

    from lorafleet.flows.cli import app

    raw = copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=160), name="ab", steps=15,
                           adalora={"init_r": 6, "target_r": 3}, method="adalora")
    del raw["lora"]["r"]
    raw["evaluation"]["max_examples"] = 4
    config = tmp_path / "ab.yaml"
    config.write_text(json.dumps(raw))
    out = tmp_path / "adalora.json"
    result = CliRunner().invoke(app, ["bench", "adalora", str(config), "--steps", "12", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    lora, ada = report["rows"]
    assert (lora["method"], ada["method"], report["steps"]) == ("lora", "adalora", 12)
    dims = sum(64 + out_dim for out_dim in (64, 32, 32, 64, 192, 192)) + 192 + 64  # tiny Llama: (in + out) per layer
    assert lora["rank"] == 3 and lora["total_rank"] == 3 * 14 and lora["final_params"] == 3 * 2 * dims
    assert lora["trainable_params"] == lora["final_params"] == lora["stored_params"]
    assert ada["total_rank"] <= lora["total_rank"] and len(report["rank_pattern"]) == 14
    assert ada["total_rank"] == sum(report["rank_pattern"].values())
    assert ada["trainable_params"] == 6 * 2 * dims + 6 * 14  # init_r triplets, E included
    assert ada["stored_params"] == ada["rank"] * 2 * dims  # padded to the largest kept rank
    assert ada["final_params"] <= ada["stored_params"]
    for row in (lora, ada):
        assert row["val_loss"] is not None and "rouge_l" in row["metrics"]
    assert "rouge_l" in report["base"] and report["n_test_rows"] == 4
    assert set(report["ratios"]) >= {"final_params"}
    assert "AdaLoRA 6→3" in result.output


def test_bench_adalora_refuses_other_methods(tmp_path, settings):
    from lorafleet.tasks.adalora_bench import variants

    raw = copy_task_config(tmp_path / "x.jsonl", method="turbo_lora")
    with pytest.raises(ValueError, match="method must be lora or adalora, not 'turbo_lora'"):
        variants(parse_config(raw), 5)
    lora, ada = variants(parse_config({**raw, "method": "lora"}), 5)  # a LoRA config: AdaLoRA's defaults
    assert (lora.lora.r, ada.adalora.target_r, ada.adalora.init_r, ada.training.max_steps) == (8, 8, 12, 5)
    assert ada.lora.alpha == lora.lora.alpha == 16 and lora.adalora is None
