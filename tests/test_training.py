"""The training loop on the tiny random Llama: loss, batching, checkpoints, resume, early stopping."""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.models.batching import IGNORE_INDEX, collate, length_grouped_batches
from lorafleet.models.checkpoints import list_checkpoints
from lorafleet.models.lora import LoraSettings, apply_lora
from lorafleet.models.loss import completion_loss
from lorafleet.models.training import train_adapter, validation_loss
from lorafleet.models.training_settings import TrainingSettings

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_rows(tokenizer, n: int, seed: int) -> list[dict]:
    """A copy task the tiny model can learn in a few dozen steps: `name is N` → JSON."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, age = rng.choice(["Ana", "Bob", "Carla", "Dmitri"]), rng.randint(18, 90)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{name} is {age}."}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        target = tokenizer(f'{{"name": "{name}", "age": {age}}}', add_special_tokens=False).input_ids
        target = target + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt_ids + target, "labels": [IGNORE_INDEX] * len(prompt_ids) + target})
    return rows


class Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.steps: list[tuple[int, float]] = []
        self.validations: list[tuple[int, float]] = []
        self.stop_at = stop_at

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, metrics["train/loss"]))
        if step == self.stop_at:
            raise KeyboardInterrupt("simulated kill")

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self.validations.append((step, metrics["val/loss"]))


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fresh_lora(model_cache):
    from lorafleet.models.base import load_base_model

    loaded = load_base_model("tiny-random-llama", model_cache)
    torch.manual_seed(0)  # LoRA A matrices are initialised from the global RNG
    return apply_lora(loaded.model, LoraSettings(r=8, alpha=16, target_modules=ALL_LINEAR)), loaded.tokenizer


def test_length_grouped_batches_cover_every_row_once_and_replay_exactly():
    rng = random.Random(1)
    lengths = [rng.randint(5, 50) for _ in range(103)]
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0, group_factor=4)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(103))
    assert batches == length_grouped_batches(lengths, 8, seed=3, epoch=0, group_factor=4)
    assert batches != length_grouped_batches(lengths, 8, seed=3, epoch=1, group_factor=4)
    # grouping by length keeps padding low: each batch spans a narrow length range
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < (max(lengths) - min(lengths)) / 2


def test_collate_right_pads_and_ignores_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_completion_loss_equals_transformers_loss(tiny_model):
    rows = make_rows(tiny_model.tokenizer, 4, seed=0)
    batch = collate(rows, tiny_model.tokenizer.pad_token_id)
    ours, n_targets = completion_loss(tiny_model.model, batch)
    reference = tiny_model.model(**batch).loss
    assert n_targets == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_training_lowers_validation_loss_and_keeps_the_best(model_cache, tmp_path):
    model, tokenizer = fresh_lora(model_cache)
    train, val = make_rows(tokenizer, 256, seed=0), make_rows(tokenizer, 32, seed=1)
    recorder = Recorder()
    settings = TrainingSettings(max_steps=40, batch_size=16, learning_rate=1e-2, eval_every=10,
                                checkpoint_every=10, precision="fp32", early_stopping_patience=None)
    before = validation_loss(model, val, batch_size=16, pad_token_id=tokenizer.pad_token_id, precision="fp32")
    result = train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "ckpt",
                           pad_token_id=tokenizer.pad_token_id, callbacks=[recorder], progress=False)
    last = min(loss for _, loss in recorder.validations)
    assert last < before * 0.5, (before, recorder.validations)
    assert validation_loss(model, val, batch_size=16, pad_token_id=tokenizer.pad_token_id,
                           precision="fp32") == pytest.approx(last)  # the model holds the best weights
    assert result.state.best_val_loss == pytest.approx(last)
    assert [step for step, _ in recorder.steps] == list(range(1, 41))
    assert (tmp_path / "ckpt" / "DONE").exists()
    assert len(list_checkpoints(tmp_path / "ckpt")) <= settings.keep_checkpoints


def test_killed_run_resumes_to_identical_weights(model_cache, tmp_path):
    """Kill at step 13 (after the step-10 checkpoint), rerun: the result equals an uninterrupted run."""
    settings = TrainingSettings(max_steps=24, batch_size=8, learning_rate=5e-3, eval_every=6,
                                checkpoint_every=5, precision="fp32", early_stopping_patience=None, seed=7)
    model, tokenizer = fresh_lora(model_cache)
    train, val = make_rows(tokenizer, 100, seed=0), make_rows(tokenizer, 16, seed=1)
    train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "straight",
                  pad_token_id=tokenizer.pad_token_id, progress=False)
    expected = lora_weights(model)

    model, _ = fresh_lora(model_cache)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "killed",
                      pad_token_id=tokenizer.pad_token_id, callbacks=[Recorder(stop_at=13)], progress=False)
    assert not (tmp_path / "killed" / "DONE").exists()
    model, _ = fresh_lora(model_cache)  # a new process would start from fresh weights too
    resumed = Recorder()
    result = train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "killed",
                           pad_token_id=tokenizer.pad_token_id, callbacks=[resumed], progress=False)
    assert result.resumed_from_step == 10
    assert resumed.steps[0][0] == 11
    for name, tensor in lora_weights(model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)

    # a third run finds DONE and returns the finished weights without training
    model, _ = fresh_lora(model_cache)
    again = train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "killed",
                          pad_token_id=tokenizer.pad_token_id, progress=False)
    assert again.already_finished
    for name, tensor in lora_weights(model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_early_stopping_stops_after_patience(model_cache, tmp_path):
    model, tokenizer = fresh_lora(model_cache)
    train, val = make_rows(tokenizer, 64, seed=0), make_rows(tokenizer, 16, seed=1)
    # A huge learning rate makes validation loss get worse, so patience runs out.
    settings = TrainingSettings(max_steps=200, batch_size=8, learning_rate=5.0, warmup_ratio=0.0, eval_every=2,
                                checkpoint_every=2, early_stopping_patience=2, precision="fp32",
                                max_grad_norm=None, lr_schedule="constant")
    recorder = Recorder()
    result = train_adapter(model, train, val, settings, checkpoint_dir=tmp_path / "ckpt",
                           pad_token_id=tokenizer.pad_token_id, callbacks=[recorder], progress=False)
    assert result.state.stopped_early
    assert result.state.step < 200
    losses = [loss for _, loss in recorder.validations]
    assert result.state.best_val_loss == pytest.approx(min(losses))
    assert len(losses) - 1 - losses.index(min(losses)) == 2  # exactly `patience` evals after the best


def test_qlora_trains_on_a_4bit_base(model_cache, tmp_path):
    from lorafleet.models.base import load_base_model

    loaded = load_base_model("tiny-random-llama", model_cache, quantization="nf4")
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = apply_lora(loaded.model, LoraSettings(r=8, target_modules=ALL_LINEAR), quantized=True)
    before = lora_weights(model)
    rows = make_rows(loaded.tokenizer, 32, seed=0)
    result = train_adapter(model, rows, rows[:8], TrainingSettings(max_steps=4, batch_size=8, eval_every=2,
                                                                    checkpoint_every=2, learning_rate=1e-2),
                           checkpoint_dir=tmp_path / "ckpt", pad_token_id=loaded.tokenizer.pad_token_id,
                           progress=False)
    assert result.state.step == 4
    changed = [n for n, t in lora_weights(model).items() if not torch.equal(t, before[n])]
    assert any("lora_B" in n for n in changed)


def test_validation_passes_do_not_change_how_qlora_trains(model_cache, tmp_path):
    """bitsandbytes repacks a 4-bit weight in place the first time it runs in eval mode on a CPU with
    AVX512-BF16 (see `keep_4bit_layout`); training must follow the same path with or without validation.
    (On a CPU without AVX512-BF16 there is nothing to repack and this passes on any code.)"""
    from lorafleet.models.base import load_base_model

    def train_losses(eval_every: int, folder: str) -> list[float]:
        loaded = load_base_model("tiny-random-llama", model_cache, quantization="nf4")
        torch.manual_seed(0)
        model = apply_lora(loaded.model, LoraSettings(r=8, target_modules=ALL_LINEAR), quantized=True)
        rows = make_rows(loaded.tokenizer, 32, seed=0)
        settings = TrainingSettings(max_steps=6, batch_size=8, eval_every=eval_every, checkpoint_every=100,
                                    learning_rate=1e-2, lr_schedule="constant", warmup_ratio=0.0)
        result = train_adapter(model, rows, rows[:8], settings, checkpoint_dir=tmp_path / folder,
                               pad_token_id=loaded.tokenizer.pad_token_id, progress=False)
        layouts = {getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if type(m).__name__ == "Linear4bit"}
        assert layouts == {False}  # still the layout it was quantized in
        return [loss for _, loss in result.state.train_history]

    assert train_losses(eval_every=1, folder="validated") == train_losses(eval_every=6, folder="once")

def test_shards_of_a_batch_are_disjoint_cover_it_and_balance_lengths():
    from lorafleet.models.batching import shard

    batch = list(range(10, 21))  # 11 rows sorted by length, as a length-grouped batch is
    parts = [shard(batch, rank, 3) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == batch
    assert [len(part) for part in parts] == [4, 4, 3]
    assert parts[0] == [10, 13, 16, 19]  # strided: every rank gets short and long rows
    assert shard(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard(batch, 2, 2)


def test_global_target_count_matches_the_collated_batch(tiny_tokenizer):
    from lorafleet.models.batching import count_targets

    rows = make_rows(tiny_tokenizer, 5, seed=3)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    assert count_targets(rows) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
