"""The generation loop on the tiny random Llama: speculative greedy == plain greedy, per-row stops, stats.

The model runs in float64. In float32 a forward over K+1 tokens and one over 1 token use different
matmul shapes, so logits differ in the last bits and a near-tie between two tokens can flip argmax;
Hugging Face's own batched vs unbatched greedy decoding has the same property. float64 makes those
flips vanishingly rare, so any difference here is a real bug.
"""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.models import decoding
from lorafleet.models.base import load_base_model
from lorafleet.models.decoding import generate, stream
from lorafleet.models.spec_cache import SpecCache
from lorafleet.models.turbo_heads import new_heads

NO_EOS = [-1]  # an id no token has: decode to the budget


@pytest.fixture(scope="module")
def model(model_cache):
    return load_base_model("tiny-random-llama", model_cache).model.double()


def random_heads(model, num_heads: int, seed: int):
    heads = new_heads(model, num_heads)
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in heads.heads:
            head.up.weight.normal_(0, 0.3)  # `up` starts at zero; random heads must differ from "next token"
    return heads


def random_prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 320) for _ in range(rng.randrange(1, 12))] for _ in range(count)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Hugging Face's own greedy decoding, end token excluded: the oracle for the plain path."""
    ids = torch.tensor([prompt])  # (1, T)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos in new else new


class ScriptedHeads:
    """Stub heads: at step i row b drafts exactly plans[b][i] correct tokens, then wrong ones.

    `reference` is each row's plain greedy stream. The loop asks for the next step's drafts right
    after each step (and after prefill), before finished rows leave the batch; the stub tracks which
    rows are in the batch with the loop's own rule (budget reached or an end token emitted). It only
    offers `draft_logits`, so tests using it switch off the merged LM-head path.
    """

    def __init__(self, reference, plans, *, num_heads, vocab, max_new_tokens, eos=()):
        self.reference, self.plans, self.num_heads, self.vocab = reference, plans, num_heads, vocab
        self.max_new_tokens, self.eos = max_new_tokens, set(eos)
        self.pending = [0] * len(plans)  # index in reference of each row's not-yet-processed token
        self.steps = [0] * len(plans)
        self.in_batch = list(range(len(plans)))

    def running(self, row: int) -> bool:
        emitted = self.reference[row][: min(self.pending[row] + 1, self.max_new_tokens)]
        return len(emitted) < self.max_new_tokens and not self.eos.intersection(emitted)

    def draft_logits(self, hidden, lm_head):
        assert len(self.in_batch) == hidden.shape[0]
        logits = torch.zeros(len(self.in_batch), self.num_heads, self.vocab)
        finished = [row for row in self.in_batch if not self.running(row)]  # drafts never used
        for i, row in enumerate(self.in_batch):
            if row in finished:
                continue
            accept = self.plans[row][self.steps[row]]
            truth = self.reference[row][self.pending[row] + 1: self.pending[row] + 1 + self.num_heads]
            draft = truth[:accept] + [(t + 1) % self.vocab for t in truth[accept:]]
            logits[i, torch.arange(self.num_heads), torch.tensor(draft)] = 1.0
            self.pending[row] += accept + 1
            self.steps[row] += 1
        self.in_batch = [row for row in self.in_batch if row not in finished]
        return logits


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_speculative_greedy_equals_plain_greedy_at_batch_1(model, seed):
    heads = random_heads(model, 3, seed)
    for prompt in random_prompts(seed, 3):
        plain = generate(model, [prompt], max_new_tokens=24, eos_token_ids=2)
        spec = generate(model, [prompt], max_new_tokens=24, eos_token_ids=2, heads=heads)
        assert spec.tokens == plain.tokens
        assert spec.finish_reasons == plain.finish_reasons
        assert plain.tokens[0] == hf_greedy(model, prompt, 24, eos=2)
        assert plain.stats.tau == 1.0 and spec.stats.num_heads == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_greedy_equals_plain_greedy_for_a_batch_of_different_lengths(model, seed, monkeypatch):
    # Compact as soon as a few slots are wasted (default: half the cache), so holes, row drops and
    # compaction all happen many times inside one run.
    monkeypatch.setattr(decoding, "_COMPACT_ABOVE", 0.05)
    compactions = count_calls(monkeypatch, SpecCache, "compact")
    prompts = random_prompts(seed + 10, 5)
    assert len({len(p) for p in prompts}) > 1
    heads = random_heads(model, 4, seed)
    spec = generate(model, prompts, max_new_tokens=40, eos_token_ids=NO_EOS, heads=heads)
    plain_batch = generate(model, prompts, max_new_tokens=40, eos_token_ids=NO_EOS)
    plain_alone = [generate(model, [p], max_new_tokens=40, eos_token_ids=NO_EOS).tokens[0] for p in prompts]
    assert spec.tokens == plain_batch.tokens == plain_alone
    assert all(len(t) == 40 for t in spec.tokens) and set(spec.finish_reasons) == {"length"}
    assert compactions, "holes never grew enough to compact: the test no longer covers compaction"


def test_rows_accepting_different_lengths_and_exact_stats(model, monkeypatch):
    """A hand-made acceptance plan: tokens still equal plain greedy, and τ / per-head counts are exact."""
    monkeypatch.setattr(decoding, "_MERGED_HEAD_ROWS", 0)
    prompts = random_prompts(3, 2)
    reference = generate(model, prompts, max_new_tokens=30, eos_token_ids=NO_EOS).tokens
    plans = [[3, 0, 1, 0], [0, 2, 2, 0]]  # each row: 1 + 4 + 1 + 2 + 1 = 1 + 1 + 3 + 3 + 1 = 9 tokens
    heads = ScriptedHeads(reference, plans, num_heads=3, vocab=model.config.vocab_size, max_new_tokens=9)
    stats = decoding.DecodeStats()
    steps = list(stream(model, prompts, max_new_tokens=9, eos_token_ids=NO_EOS, heads=heads, stats=stats))
    assert [len(t) for t in steps[1].new_tokens] == [4, 1]  # the same step, different acceptance
    tokens: list[list[int]] = [[], []]
    for step in steps:
        for row, new in zip(step.rows, step.new_tokens):
            tokens[row].extend(new)
    assert tokens == [reference[0][:9], reference[1][:9]]
    assert stats.steps == 4 and stats.emitted_tokens == 18
    assert stats.accepted_per_step == [3, 0, 0, 2, 1, 2, 0, 0]
    assert stats.tau == 2.0
    assert stats.head_trials == [8, 4, 3] and stats.head_accepts == [4, 3, 1]
    assert stats.accepted_histogram() == [4, 1, 2, 1]


def test_end_token_inside_an_accepted_chain_and_budgets_stop_rows_independently(model, monkeypatch):
    monkeypatch.setattr(decoding, "_MERGED_HEAD_ROWS", 0)
    prompts = random_prompts(5, 3)
    reference = generate(model, prompts, max_new_tokens=40, eos_token_ids=NO_EOS).tokens
    # An end token that row 0 emits mid-chain (not as a bonus), absent earlier from every row.
    index, eos = next((i, t) for i, t in enumerate(reference[0])
                      if i >= 2 and i % 4 != 0 and all(t not in r[:i + 1] for r in reference[1:])
                      and t not in reference[0][:i])
    heads = ScriptedHeads(reference, [[3] * 40] * 3, num_heads=3, vocab=model.config.vocab_size,
                          max_new_tokens=index + 1, eos=[eos])
    result = generate(model, prompts, max_new_tokens=index + 1, eos_token_ids=[eos], heads=heads)
    plain = generate(model, prompts, max_new_tokens=index + 1, eos_token_ids=[eos])
    assert result.tokens == plain.tokens
    assert result.tokens[0] == reference[0][:index] and result.finish_reasons[0] == "stop"
    for row in (1, 2):
        assert result.tokens[row] == reference[row][:index + 1] and result.finish_reasons[row] == "length"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_lm_head_call_drafts_exactly_like_the_heads_own_path(model, monkeypatch, batch_size):
    """Scoring target and head rows in one LM-head call must give the same drafts as `draft_logits`."""
    prompts = random_prompts(9, batch_size)
    heads = new_heads(model, 3)  # `up` = 0: drafts repeat the next token, which this model often accepts
    monkeypatch.setattr(decoding, "_MERGED_HEAD_ROWS", 10_000)
    merged = generate(model, prompts, max_new_tokens=30, eos_token_ids=NO_EOS, heads=heads)
    monkeypatch.setattr(decoding, "_MERGED_HEAD_ROWS", 0)
    separate = generate(model, prompts, max_new_tokens=30, eos_token_ids=NO_EOS, heads=heads)
    assert merged.tokens == separate.tokens
    assert merged.stats.accepted_per_step == separate.stats.accepted_per_step
    assert sum(merged.stats.accepted_per_step) > 0


def test_tiny_budgets(model):
    prompts = random_prompts(6, 2)
    heads = random_heads(model, 2, 0)
    nothing = generate(model, prompts, max_new_tokens=0, eos_token_ids=2, heads=heads)
    assert nothing.tokens == [[], []] and nothing.finish_reasons == ["length", "length"]
    one = generate(model, prompts, max_new_tokens=1, eos_token_ids=NO_EOS, heads=heads)
    assert [len(t) for t in one.tokens] == [1, 1] and one.stats.steps == 0


def test_peft_wrapped_model_decodes_with_its_adapter(model_cache):
    from lorafleet.models.lora import LoraSettings, apply_lora

    base = load_base_model("tiny-random-llama", model_cache).model.double()
    prompts = random_prompts(7, 3)
    bare = generate(base, prompts, max_new_tokens=16, eos_token_ids=NO_EOS).tokens
    peft_model = apply_lora(base, LoraSettings(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.eval()
    heads = random_heads(peft_model, 3, 1)
    spec = generate(peft_model, prompts, max_new_tokens=16, eos_token_ids=NO_EOS, heads=heads)
    plain = generate(peft_model, prompts, max_new_tokens=16, eos_token_ids=NO_EOS)
    assert spec.tokens == plain.tokens
    assert plain.tokens != bare  # the adapter is really applied
    assert plain.tokens[0] == hf_greedy(peft_model, prompts[0], 16, eos=-1)


def test_speculative_sampling_matches_plain_sampling_in_distribution(model):
    """Many copies of one prompt in one batch (rows sample independently): the 2nd and 3rd tokens of
    speculative and plain sampling come from the same distribution (two-sample χ², fixed seeds)."""
    prompts = [[1, 82, 82, 82]] * 2000
    heads = new_heads(model, 3)  # `up` = 0: every head drafts the model's next token, often accepted here
    options = {"max_new_tokens": 3, "eos_token_ids": NO_EOS, "temperature": 0.3, "top_p": 0.9}
    spec = generate(model, prompts, heads=heads, seed=1, **options)
    plain = generate(model, prompts, seed=2, **options)
    assert sum(spec.stats.accepted_per_step) > 500  # drafts really decided many tokens
    for position in (1, 2):
        p_value = two_sample_chi2([t[position] for t in spec.tokens], [t[position] for t in plain.tokens])
        assert p_value > 1e-3
    other = generate(model, prompts, seed=3, **{**options, "temperature": 0.5})  # the check can fail
    assert two_sample_chi2([t[1] for t in spec.tokens], [t[1] for t in other.tokens]) < 1e-6


def test_bad_arguments_name_the_problem(model):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1, 2], []], max_new_tokens=4, eos_token_ids=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=-1, eos_token_ids=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, eos_token_ids=2, top_p=1.5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 2000], max_new_tokens=100, eos_token_ids=2)
    with pytest.raises(ValueError, match="temperature"):
        stream(model, [[1]], max_new_tokens=2, eos_token_ids=2, temperature=-0.5)  # at the call, not at next()


def count_calls(monkeypatch, cls, name: str) -> list[None]:
    """Record calls to a real method (it still runs)."""
    calls: list[None] = []
    original = getattr(cls, name)

    def spy(self, *args, **kwargs):
        calls.append(None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return calls


def two_sample_chi2(a: list[int], b: list[int], min_count: int = 10) -> float:
    """p-value that two samples share one categorical distribution; rare categories are pooled."""
    categories = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c), b.count(c)] for c in categories], dtype=torch.float64)  # (C, 2)
    rare = counts.sum(dim=1) < min_count
    table = torch.cat([counts[~rare], counts[rare].sum(dim=0, keepdim=True)])  # (C', 2)
    table = table[table.sum(dim=1) > 0]
    expected = table.sum(dim=1, keepdim=True) * table.sum(dim=0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = table.shape[0] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_streaming_does_not_leak_inference_mode_to_the_caller(model):
    heads = random_heads(model, 2, 0)
    steps = stream(model, random_prompts(8, 2), max_new_tokens=5, eos_token_ids=NO_EOS, heads=heads)
    for _ in steps:
        assert not torch.is_inference_mode_enabled()
