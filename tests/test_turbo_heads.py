"""Turbo heads: size against Medusa-1, save/load, and joint training with LoRA on the tiny model."""

from __future__ import annotations

import pytest
import torch
from test_training import ALL_LINEAR, make_rows

from lorafleet.models.adapter_dir import TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE
from lorafleet.models.lora import LoraSettings, apply_lora
from lorafleet.models.loss import TurboObjective, unwrap_causal_lm
from lorafleet.models.training import train_adapter, validation_metrics
from lorafleet.models.training_settings import TrainingSettings
from lorafleet.models.turbo_heads import (
    TurboHeads,
    TurboHeadsConfig,
    load_heads,
    medusa1_equivalent_parameters,
    new_heads,
    save_heads,
)
from lorafleet.models.turbo_settings import TurboSettings


def test_heads_are_under_ten_percent_of_medusa1_at_smollm2_size():
    config = TurboHeadsConfig(num_heads=4, hidden_size=576, block_size=576, vocab_size=49152)
    ours = TurboHeads(config).num_parameters()
    medusa = medusa1_equivalent_parameters(4, 576, 49152)
    assert ours == 4 * 2 * 576 * 576
    assert ours / medusa < 0.10
    assert ours / medusa == pytest.approx(0.0231, abs=0.001)


def test_fresh_heads_predict_the_next_token_and_round_trip(tiny_model, tmp_path):
    heads = new_heads(tiny_model.model, num_heads=3)
    lm_head = unwrap_causal_lm(tiny_model.model).get_output_embeddings()
    hidden = torch.randn(2, 64)
    # W_up starts at zero: every head is the identity, i.e. "predict the next token"
    torch.testing.assert_close(heads.draft_logits(hidden, lm_head), lm_head(hidden)[:, None].expand(2, 3, -1))

    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0, 0.3)
    save_heads(heads, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE}
    loaded = load_heads(tmp_path)
    assert loaded.config == heads.config
    torch.testing.assert_close(loaded.draft_logits(hidden, lm_head), heads.draft_logits(hidden, lm_head))
    assert not torch.allclose(heads.draft_logits(hidden, lm_head)[:, 0], heads.draft_logits(hidden, lm_head)[:, 1])


def test_turbo_objective_scores_head_k_against_the_token_k_plus_one_ahead(tiny_model):
    """Identity heads on a sequence of one repeated token: head k's prediction at t is the LM's, and its
    target (the token at t+1+k) is the same token, so its loss is the LM's per-position loss averaged
    over the positions t that still have a token k+1 ahead."""
    model = tiny_model.model
    heads = new_heads(model, num_heads=2)
    ids = torch.full((1, 12), 77)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    sums = TurboObjective(model, heads, [1.0, 1.0], lm_weight=1.0)(batch).sums
    with torch.no_grad():
        per_position = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:],
                                                         reduction="none")  # (11,)
    assert sums["lm_loss_sum"] / sums["lm_loss_count"] == pytest.approx(float(per_position.mean()), rel=1e-5)
    for k in (1, 2):
        assert sums[f"head{k}_count"] == 12 - 1 - k
        expected = float(per_position[: 12 - 1 - k].mean())
        assert sums[f"head{k}_loss_sum"] / sums[f"head{k}_count"] == pytest.approx(expected, rel=1e-5)


def test_joint_training_teaches_the_heads(model_cache, tmp_path):
    from lorafleet.models.base import load_base_model

    loaded = load_base_model("tiny-random-llama", model_cache)
    torch.manual_seed(0)
    model = apply_lora(loaded.model, LoraSettings(r=8, alpha=16, target_modules=ALL_LINEAR))
    heads = new_heads(model, num_heads=2)
    train, val = make_rows(loaded.tokenizer, 256, seed=0), make_rows(loaded.tokenizer, 32, seed=1)
    turbo = TurboSettings(num_heads=2, head_learning_rate=1e-2)
    objective = TurboObjective(model, heads, turbo.head_weights(), lm_weight=1.0)
    module = torch.nn.ModuleDict({"model": model, "heads": heads})
    before = validation_metrics(objective, module, val, batch_size=16, pad_token_id=0, precision="fp32")
    recorded = []

    class Record:
        def on_train_step(self, step, metrics): pass
        def on_validation(self, step, metrics): recorded.append(metrics)

    train_adapter(model, train, val, TrainingSettings(max_steps=60, batch_size=16, learning_rate=1e-2, eval_every=20,
                                                      checkpoint_every=20, precision="fp32",
                                                      early_stopping_patience=None),
                  checkpoint_dir=tmp_path / "ckpt", pad_token_id=loaded.tokenizer.pad_token_id, heads=heads,
                  turbo=turbo, callbacks=[Record()], progress=False)
    after = validation_metrics(objective, module, val, batch_size=16, pad_token_id=0, precision="fp32")
    for k in (1, 2):
        assert after[f"head{k}_acc"] > before[f"head{k}_acc"] + 0.2, (before, after)
        assert f"val/head{k}_acc" in recorded[-1]
    assert after["lm_loss"] < before["lm_loss"] * 0.5
