"""`bench engine`'s measurement on the tiny random Llama (~10 s): every figure is measured, the prefix
cache reuses the shared prompt prefix in the mixed run, and nothing is left running or resident."""

from __future__ import annotations

from pathlib import Path

from lorafleet.evaluation.engine_bench import measure_engine
from lorafleet.models.base import load_base_model
from lorafleet.serving.engine.config import EngineConfig

from serving_helpers import BASE, make_adapter


def test_measure_engine_reports_every_figure_on_the_tiny_model(tmp_path: Path, model_cache: Path):
    from peft import PeftModel

    loaded = load_base_model(BASE, model_cache)
    dirs = {f"a{i}": make_adapter(model_cache, tmp_path / f"a{i}", name=f"a{i}", seed=i) for i in range(2)}

    def make_peft():
        model = PeftModel.from_pretrained(loaded.model, str(dirs["a0"]), adapter_name="a0")
        model.load_adapter(str(dirs["a1"]), adapter_name="a1")
        return model.eval()

    shared = list(range(5, 41))  # 36 shared tokens = 2 full blocks of 16, as a system prompt would be
    prompts = [shared + [50 + i, 60 + i] for i in range(4)]
    warm_prompts = [shared + [70 + i, 80 + i] for i in range(4)]  # other user turns, same system prompt
    lines: list[str] = []
    # 40 tokens per step admits one request per step: each adapter's second request finds the first's
    # prefix computed (requests admitted in the same step cannot share: neither is computed yet).
    config = EngineConfig(adapter_slots=2, max_lora_rank=8, max_tokens_per_step=40)
    report = measure_engine(loaded.model, make_peft, dirs, prompts, warm_prompts=warm_prompts, max_new_tokens=4,
                            pad_id=0, config=config, rounds=2, progress=lines.append)
    rates = [report.hf_generate_tokens_per_s, report.batch1_tokens_per_s, report.single_adapter_tokens_per_s,
             report.mixed_adapters_tokens_per_s, report.mixed_adapters_no_prefix_cache_tokens_per_s, report.single_adapter_no_prefix_cache_tokens_per_s,
             report.peft_mixed_batch_tokens_per_s, report.serial_tokens_per_s]
    assert all(rate > 0 for rate in rates)
    assert report.hf_decode_ms_per_token > 0 and report.batch1_decode_ms_per_token > 0
    assert report.n_adapters == 2 and report.n_requests == 4 and report.max_new_tokens == 4 and report.rounds == 2
    assert sum("round 2/2" in line for line in lines) == 7  # six engine runs and the PEFT batch, again
    assert all(len(values) == 2 for values in report.round_tokens_per_s.values())
    mixed_rounds = report.round_tokens_per_s["mixed"]
    assert min(mixed_rounds) <= report.mixed_adapters_tokens_per_s <= max(mixed_rounds)
    # Requests 2 and 3 reuse the 2 shared blocks their adapter's first request computed (2 x 32 of 152
    # tokens); the cache was emptied after the warm-up, so nothing else can hit.
    assert report.mixed_prefix_cache_hit_rate == 64 / sum(map(len, prompts))
    # Warm: the warm-up requests left both adapters' shared blocks cached, so all 4 requests reuse them.
    assert report.mixed_warm_prefix_cache_hit_rate == 4 * 32 / sum(map(len, prompts))
    assert set(report.to_dict()["ratios"]) >= {"mixed_vs_peft_mixed_batch", "mixed_no_prefix_cache_vs_peft_mixed_batch",
                                               "mixed_vs_single_adapter_no_prefix_cache",
                                               "mixed_vs_single_adapter_warm_prefix",
                                               "mixed_warm_prefix_vs_peft_mixed_batch",
                                               "batch1_decode_vs_hf_decode"}
    assert len(lines) >= 6


def test_the_bench_builds_lora_slots_in_the_models_dtype(tmp_path: Path, model_cache: Path):
    """A bf16 model (what a GPU serves, and a CPU with native bf16) gets bf16 LoRA slots and inputs on its
    device: the bench used to build fp32 slots on the CPU, which a bf16 step cannot multiply with."""
    from peft import PeftModel

    loaded = load_base_model(BASE, model_cache, dtype="bfloat16")
    dirs = {"a0": make_adapter(model_cache, tmp_path / "a0", name="a0", seed=0)}
    prompts = [list(range(5, 20)), list(range(7, 25))]
    report = measure_engine(loaded.model, lambda: PeftModel.from_pretrained(loaded.model, str(dirs["a0"]),
                                                                            adapter_name="a0").eval(),
                            dirs, prompts, warm_prompts=prompts, max_new_tokens=3, pad_id=0, rounds=1,
                            config=EngineConfig(adapter_slots=1, max_lora_rank=8), progress=lambda _: None)
    assert (report.dtype, report.device) == ("bfloat16", "cpu")
    assert report.mixed_adapters_tokens_per_s > 0 and report.batch1_tokens_per_s > 0

