"""Pure speculative functions on hand-made logits: propose, verify (greedy and sampled), sampling, stats."""

from __future__ import annotations

import pytest
import torch

from lorafleet.models.speculative import head_acceptance, propose, sample_tokens, verify

V = 8


def peaked(tokens: list[list[int]], vocab: int = V) -> torch.Tensor:
    """Logits (B, T, V) whose argmax at [b, t] is tokens[b][t], with a clear margin."""
    logits = torch.randn(len(tokens), len(tokens[0]), vocab, generator=torch.Generator().manual_seed(0))
    return logits.scatter(2, torch.tensor(tokens).unsqueeze(-1), 10.0)


def one_hot_logits(tokens: list[list[int]], vocab: int = V) -> torch.Tensor:
    """Logits where only tokens[b][t] has any probability, so even sampling is deterministic."""
    logits = torch.full((len(tokens), len(tokens[0]), vocab), float("-inf"))
    return logits.scatter(2, torch.tensor(tokens).unsqueeze(-1), 0.0)


def chi2_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson χ² goodness of fit; the survival function of χ²(df) is the upper regularised gamma."""
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_propose_takes_the_top_token_of_every_head():
    draft_logits = peaked([[3, 1, 4], [0, 7, 2]])  # (B=2, K=3, V)
    assert propose(draft_logits).tolist() == [[3, 1, 4], [0, 7, 2]]
    with pytest.raises(ValueError, match="batch, heads, vocab"):
        propose(draft_logits[0])


@pytest.mark.parametrize("logits_of", [peaked, one_hot_logits], ids=["greedy", "sampled"])
def test_verify_never_always_and_sometimes_accept(logits_of):
    """Rows of one batch: every draft wrong, every draft right (bonus from position K), two of three right."""
    target = [[5, 1, 2, 3], [5, 6, 7, 1], [5, 6, 0, 2]]  # the target's token at each of the K+1 positions
    draft = torch.tensor([[4, 6, 7], [5, 6, 7], [5, 6, 7]])  # (B=3, K=3)
    sampling = ({"temperature": 0.0} if logits_of is peaked
                else {"temperature": 1.0, "generator": torch.Generator().manual_seed(0)})
    result = verify(draft, logits_of(target), **sampling)
    assert result.accepted.tolist() == [0, 3, 2]
    assert result.next_token.tolist() == [5, 1, 0]
    assert [result.emitted(row) for row in range(3)] == [[5], [5, 6, 7, 1], [5, 6, 0]]


def test_verify_a_draft_after_a_rejection_never_counts():
    """Position 2 matches but position 1 does not: only a prefix is accepted."""
    result = verify(torch.tensor([[3, 9 % V, 2]]), peaked([[3, 4, 2, 6]]))
    assert result.accepted.tolist() == [1]
    assert result.next_token.tolist() == [4]


def test_verify_with_no_drafts_is_plain_decoding():
    result = verify(torch.empty(2, 0, dtype=torch.long), peaked([[3], [6]]))
    assert result.accepted.tolist() == [0, 0]
    assert result.next_token.tolist() == [3, 6]


def test_verify_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="K\\+1=4"):
        verify(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, V))


def test_sample_tokens_per_row_temperature_and_validation():
    logits = peaked([[2], [5]])[:, 0]  # (B=2, V)
    generator = torch.Generator().manual_seed(0)
    temperature = torch.tensor([0.0, 50.0])  # row 0 greedy, row 1 nearly uniform
    draws = torch.stack([sample_tokens(logits, temperature=temperature, generator=generator)
                         for _ in range(200)])  # (200, B)
    assert (draws[:, 0] == 2).all()
    assert len(set(draws[:, 1].tolist())) > 3  # row 1 really samples
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, temperature=1.0, top_p=0.0)


def test_verify_takes_per_row_sampling_settings():
    """Row 0 greedy, row 1 a tiny nucleus (always its top token), row 2 free sampling."""
    logits = peaked([[2, 4, 6], [5, 1, 3], [0, 0, 0]])  # (B=3, K+1=3, V)
    logits[2] = 0.0  # row 2: uniform target
    draft = torch.tensor([[2, 4], [5, 7], [1, 1]])
    settings = {"temperature": torch.tensor([0.0, 5.0, 1.0]), "top_p": torch.tensor([1.0, 1e-6, 1.0])}
    draws = [verify(draft, logits, generator=torch.Generator().manual_seed(seed), **settings)
             for seed in range(50)]
    assert all(d.accepted[:2].tolist() == [2, 1] and d.next_token[:2].tolist() == [6, 1] for d in draws)
    assert len({d.target_tokens[2, 0].item() for d in draws}) > 5


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    logits = probs.log().expand(4000, -1)  # (N, 5)
    draws = sample_tokens(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.75 needs token 1 too; 0.8 >= 0.75 stops there
    tiny = sample_tokens(logits, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert (tiny == 0).all()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45], ids=["1e-300", "denormal-min", "fp32-denormal"])
def test_a_top_p_below_the_dtypes_resolution_keeps_the_most_likely_token(top_p, dtype):
    """Found by the HTTP property test: `top_p: 1e-300` is a valid (0, 1] number but 0.0 in fp32, which
    zeroed every token and made the row NaN (a 500). Scalar and per-row tensor forms, every logits dtype."""
    logits = torch.tensor([0.1, 2.0, 0.3, -1.0]).to(dtype).expand(8, -1)  # (N, 4): token 1 most likely
    for p in (top_p, torch.full((8,), top_p, dtype=torch.float64)):
        draws = sample_tokens(logits, temperature=1.0, top_p=p, generator=torch.Generator().manual_seed(0))
        assert (draws == 1).all()

TARGET_0 = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5, 0.0])  # distribution of the first emitted token
TARGET_1 = torch.tensor([0.0, -0.5, 2.0, 1.0, 0.3, 0.8])  # after draft d_1: distribution of the second


@pytest.mark.parametrize("draft_token", [1, 2], ids=["likely-draft", "unlikely-draft"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_speculative_sampling_preserves_the_target_distribution(draft_token, top_p):
    """χ² (fixed seed): the first emitted token follows the target, and so does the second given the first.

    N independent rows verify the same draft in one call. A likely draft is mostly accepted, an
    unlikely one mostly rejected: either way the emitted tokens must follow the target.
    """
    n, temperature = 40_000, 0.8
    target_logits = torch.stack([TARGET_0, TARGET_1, TARGET_1]).expand(n, -1, -1)  # (N, K+1=3, V=6)
    draft = torch.tensor([draft_token, 2]).expand(n, -1)  # (N, K=2)
    result = verify(draft, target_logits, temperature=temperature, top_p=top_p,
                    generator=torch.Generator().manual_seed(1234))
    first = torch.where(result.accepted > 0, draft[:, 0], result.next_token)  # (N,)
    expected_0 = nucleus_probs(TARGET_0, temperature, top_p)
    assert_follows(first, expected_0)
    after_draft = result.accepted > 0  # rows whose second token was drawn after d_1
    assert after_draft.sum() > 1000
    second = torch.where(result.accepted > 1, draft[:, 1], result.next_token)[after_draft]
    assert_follows(second, nucleus_probs(TARGET_1, temperature, top_p))
    # The acceptance rate of d_1 is the target's own probability of it (same as rejection sampling).
    assert abs(after_draft.double().mean() - expected_0[draft_token]) < 0.01


def test_plain_sampling_matches_the_target_distribution():
    n = 40_000
    draws = sample_tokens(TARGET_0.expand(n, -1), temperature=1.3, top_p=0.95,
                          generator=torch.Generator().manual_seed(7))
    assert_follows(draws, nucleus_probs(TARGET_0, 1.3, 0.95))


def test_chi2_check_detects_a_wrong_distribution():
    """The χ² helper must be able to fail: temperature 1 draws do not follow the T=0.8 target."""
    draws = sample_tokens(TARGET_0.expand(40_000, -1), temperature=1.0,
                          generator=torch.Generator().manual_seed(7))
    expected = nucleus_probs(TARGET_0, 0.8, 1.0)
    assert chi2_p_value(torch.bincount(draws, minlength=6).double(), expected * 40_000) < 1e-6


def test_head_acceptance_counts_trials_only_after_accepted_prefixes():
    trials, accepts = head_acceptance([3, 0, 0, 2, 1, 2, 0, 0], num_heads=3)
    assert trials == [8, 4, 3]
    assert accepts == [4, 3, 1]


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Reference: softmax at `temperature`, keep the most likely tokens until their mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    kept = torch.zeros_like(probs)
    mass = 0.0
    for index in probs.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        kept[index] = probs[index]
        mass += float(probs[index])
    return kept / kept.sum()


def assert_follows(draws: torch.Tensor, probs: torch.Tensor) -> None:
    observed = torch.bincount(draws, minlength=probs.numel()).double()
    support = probs > 0
    assert observed[~support].sum() == 0, "drew a token the target gives zero probability"
    p_value = chi2_p_value(observed[support], probs[support] * draws.numel())
    assert p_value > 1e-3, f"χ² p-value {p_value:.2e}: observed {observed.tolist()} vs {probs.tolist()}"
