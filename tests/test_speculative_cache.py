"""SpecCache bookkeeping: holes, positions, masks, crop, rollback, row selection and compaction."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafleet.models.base import load_base_model
from lorafleet.models.spec_cache import SpecCache
from lorafleet.models.tiny import tiny_llama_config


def fake_forward(cache: SpecCache, n: int) -> torch.Tensor:
    """Append n slots to every layer as a forward would; slot values number every slot ever fed."""
    start = getattr(cache, "_fed", 0)
    cache._fed = start + n
    marks = torch.arange(start, start + n, dtype=torch.float32)  # (n,)
    keys = marks.view(1, 1, n, 1).expand(cache.batch_size, 2, n, 16).clone()  # (B, H, n, D)
    for layer_idx in range(len(cache.cache.layers)):
        cache.cache.update(keys, keys.clone(), layer_idx)
    return marks


def slot_marks(cache: SpecCache, layer: int = 0) -> torch.Tensor:
    return cache.cache.layers[layer].keys[:, 0, :, 0]  # (B, L)


def new_cache(batch_size: int) -> SpecCache:
    return SpecCache(tiny_llama_config(), batch_size, "cpu")


def test_rows_keeping_different_counts_leave_holes_and_positions_count_only_real_tokens():
    cache = new_cache(3)
    fake_forward(cache, 4)
    cache.commit(torch.tensor([4, 4, 4]))
    assert not cache.has_holes and cache.attention_mask(2) is None
    fake_forward(cache, 4)  # e.g. x plus 3 drafts
    cache.commit(torch.tensor([1, 3, 2]))
    # No row kept the 4th slot: it is cropped, not left as a hole.
    assert cache.num_slots == 7 and cache.pending == 0 and cache.cache.get_seq_length() == 7
    assert cache.lengths.tolist() == [5, 7, 6]
    assert cache.valid[:, 4:].tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert cache.positions_for(2).tolist() == [[5, 6], [7, 8], [6, 7]]
    mask = cache.attention_mask(2)
    assert mask.shape == (3, 9)
    assert mask[:, 7:].all() and torch.equal(mask[:, :7], cache.valid)


def test_batch_of_one_never_has_holes_only_crops():
    cache = new_cache(1)
    fake_forward(cache, 3)
    cache.commit(torch.tensor([3]))
    for keep in [1, 4, 2]:
        fake_forward(cache, 4)
        cache.commit(torch.tensor([keep]))
        assert not cache.has_holes and cache.attention_mask(4) is None
    assert cache.num_slots == cache.lengths.item() == 3 + 1 + 4 + 2
    assert slot_marks(cache)[0].tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 11, 12]


def test_rollback_discards_every_pending_slot():
    cache = new_cache(2)
    fake_forward(cache, 2)
    cache.commit(torch.tensor([2, 2]))
    fake_forward(cache, 3)
    assert cache.pending == 3
    cache.rollback()
    assert cache.pending == 0 and cache.num_slots == 2 and cache.lengths.tolist() == [2, 2]


def test_left_padded_prefill_starts_with_holes():
    cache = new_cache(2)
    prompt_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    positions, mask = cache.inputs_for_mask(prompt_mask)
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert torch.equal(mask, prompt_mask)
    fake_forward(cache, 4)
    cache.commit_mask(prompt_mask)
    assert cache.has_holes and cache.lengths.tolist() == [2, 4]
    assert cache.positions_for(1).tolist() == [[2], [4]]


def test_commit_rejects_bad_counts_and_structural_changes_need_a_clean_cache():
    cache = new_cache(2)
    fake_forward(cache, 3)
    with pytest.raises(ValueError, match="keep must be in \\[0, 3\\]"):
        cache.commit(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        cache.commit(torch.tensor([1]))
    with pytest.raises(RuntimeError, match="3 slots are pending"):
        cache.compact()
    with pytest.raises(RuntimeError, match="pending"):
        cache.select_rows(torch.tensor([0]))


def test_select_rows_and_compact_keep_real_tokens_in_order():
    cache = new_cache(3)
    fake_forward(cache, 2)
    cache.commit(torch.tensor([2, 2, 2]))
    for keep in ([1, 3, 2], [3, 1, 1], [1, 2, 3]):
        fake_forward(cache, 3)
        cache.commit(torch.tensor(keep))
    real = [slot_marks(cache)[row][cache.valid[row]].tolist() for row in range(3)]
    cache.select_rows(torch.tensor([0, 2]))  # row 1 finished
    assert cache.lengths.tolist() == [7, 8]
    assert cache.wasted_fraction() == pytest.approx(1 - 8 / 11)
    cache.compact()
    assert cache.num_slots == 8 and cache.valid[1].all() and cache.valid[0].tolist() == [False] + [True] * 7
    assert slot_marks(cache)[0, 1:].tolist() == real[0]
    assert slot_marks(cache)[1].tolist() == real[2]
    assert slot_marks(cache, layer=1)[1].tolist() == real[2]


def test_compaction_does_not_change_what_the_model_computes(model_cache):
    """The next forward over a compacted cache equals the one over the cache with holes."""
    model = load_base_model("tiny-random-llama", model_cache).model.double()
    decoder = model.get_decoder()
    cache = SpecCache(model.config, 2, "cpu")
    prompt_mask = torch.tensor([[False, True, True], [True, True, True]])
    positions, mask = cache.inputs_for_mask(prompt_mask)
    with torch.inference_mode():
        decoder(input_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=mask, position_ids=positions,
                past_key_values=cache.cache, use_cache=True)
        cache.commit_mask(prompt_mask)
        for step, keep in enumerate(([3, 1], [1, 3])):
            decoder(input_ids=torch.arange(6).view(2, 3) + 10 * step + 10,
                    attention_mask=cache.attention_mask(3), position_ids=cache.positions_for(3),
                    past_key_values=cache.cache, use_cache=True)
            cache.commit(torch.tensor(keep))
        compacted = copy.deepcopy(cache)
        compacted.compact()
        assert cache.num_slots == 9 and compacted.num_slots == 7

        def next_states(c: SpecCache) -> torch.Tensor:
            return decoder(input_ids=torch.tensor([[20, 21], [22, 23]]), attention_mask=c.attention_mask(2),
                           position_ids=c.positions_for(2), past_key_values=c.cache,
                           use_cache=True).last_hidden_state  # (B, 2, d)

        torch.testing.assert_close(next_states(compacted), next_states(cache))
