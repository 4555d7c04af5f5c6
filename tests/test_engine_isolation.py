"""One tenant never hurts another, inside the engine (issue 13, items A1-A3).

* A refused `add_request` changes nothing (all or nothing), and `SamplingParams` refuses every value the
  engine cannot represent, naming the parameter; the generator turns refusals into RequestRejected.
* A slot holding NaN/Inf cannot reach another row on any LoRA path, nor through attention padding, and
  end to end the bystanders' greedy tokens are those of a run without the bad request, which fails alone.
* A failure injected into one row's adapter (the forward) or heads (drafting) fails that request only;
  the engine keeps serving.
* Adapter files are checked at load: finite values, heads sized for the base model, sizes bounded
  before anything is allocated, and no error message quotes a file's contents.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import FIRST_COMPLETED
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_model import tiny_hf

from lorafleet.models.base import load_base_model
from lorafleet.models.lora_weights import random_lora, read_peft_adapter
from lorafleet.models.sampling_rules import SEED_MAX, SEED_MIN, InvalidRequest
from lorafleet.models.turbo_heads import load_heads
from lorafleet.serving.engine.adapter_cache import (
    AdapterCache,
    AdapterNotFound,
    LoadedAdapter,
    ResolvedAdapter,
    read_adapter_dir,
)
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama, ForwardBatch
from lorafleet.serving.engine.sequence import SamplingParams
from lorafleet.serving.generation.interface import GenerationRequest, RequestRejected
from lorafleet.serving.generation.interface import SamplingParams as ApiSampling

from serving_helpers import BASE, add_heads, make_adapter

EOS = 2
MAX_NEW = 10
PROMPTS = [[5, 17, 42, 8, 99], [3, 3, 7], [120, 64, 2, 11, 19, 23, 31, 77, 6], [9, 10, 11, 12]]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=frozenset({EOS}))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("isolation-adapters")
    dirs = {f"a{i}": make_adapter(model_cache, root / f"a{i}", name=f"a{i}", seed=40 + i) for i in range(3)}
    dirs["turbo"] = add_heads(make_adapter(model_cache, root / "turbo", name="turbo", seed=47), model_cache,
                              seed=5, num_heads=3)
    dirs["turbo_bad"] = Path(shutil.copytree(dirs["turbo"], root / "turbo_bad"))  # its heads raise (see reader)
    return dirs


@pytest.fixture(scope="module")
def compact(model_cache: Path) -> CompactLlama:
    return CompactLlama.from_hf(load_base_model(BASE, model_cache).model)


def make_engine(compact: CompactLlama, adapters: dict[str, Path], *, slots: LoraSlots | None = None,
                reader=None, **config) -> Engine:
    known = dict(adapters)

    def resolve(name: str) -> ResolvedAdapter:
        if name not in known:
            raise AdapterNotFound(f"no adapter named {name!r}")
        return ResolvedAdapter(name=name, identity="v1", path=known[name])

    settings = EngineConfig(**{"kv_cache_mb": 4, "adapter_slots": 4, "max_lora_rank": 8, **config})
    slots = slots or LoraSlots(compact.shape, settings.adapter_slots, settings.max_lora_rank)
    engine = Engine(compact, settings, adapters=AdapterCache(slots, compact.shape, resolve, reader=reader))
    engine.known = known  # tests remove names from here to make them unresolvable
    return engine


def warm(engine: Engine, *names: str) -> None:
    """Make adapters resident before requests arrive, so every request joins the first forward."""
    for name in names:
        engine.adapters.request(name)
    engine.adapters.wait_loading(timeout=60)
    engine.adapters.install_ready()
    assert all(engine.adapters.slot_of(name) is not None for name in names)


def drive(engine: Engine, requests: dict[str, tuple[str | None, list[int], SamplingParams]],
          ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Add every request, step until all finish; (tokens per request, error per failed request)."""
    for request_id, (adapter, prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, adapter)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    errors: dict[str, str] = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        outputs = engine.step()
        if not outputs:
            engine.adapters.wait_loading(timeout=30, return_when=FIRST_COMPLETED)
        for out in outputs:  # requests added before `drive` report here too
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason == "error":
                errors[out.request_id] = out.error
    assert not engine.has_unfinished()
    return tokens, errors


def alone(compact, adapters, requests, **config) -> dict[str, list[int]]:
    """The oracle: the same requests on a fresh engine, none failing."""
    engine = make_engine(compact, adapters, **config)
    tokens, errors = drive(engine, requests)
    assert not errors, errors
    return tokens


def state(engine: Engine) -> tuple:
    """Everything a refused request must leave untouched."""
    sched = engine.scheduler
    return (tuple(s.request_id for s in sched.waiting), tuple(s.request_id for s in sched.running),
            tuple(sorted(sched._live)), tuple(sorted(engine._live)), engine.allocator.num_free(),
            dict(engine.stats.requests_by_adapter), engine.adapters.stats.misses)


# ----- A1: all or nothing at add_request --------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**64), ("seed", SEED_MIN - 1), ("seed", 1.5), ("seed", True),
    ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -0.5), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("max_new_tokens", 0), ("max_new_tokens", 2**40),
    ("max_new_tokens", 3.0), ("stop_token_ids", [-1]), ("stop_token_ids", [2**63]), ("stop_token_ids", ["a"]),
])
def test_sampling_params_refuse_what_the_engine_cannot_represent_naming_the_field(field, value):
    kwargs = {"max_new_tokens": 4, "temperature": 1.0, field: value}
    with pytest.raises(InvalidRequest) as error:
        SamplingParams(**kwargs)
    assert error.value.param == field and field in str(error.value)


def test_seed_bounds_are_exactly_what_torch_generators_take():
    for seed in (SEED_MIN, SEED_MAX):
        torch.Generator().manual_seed(seed)
        assert SamplingParams(max_new_tokens=1, temperature=1.0, seed=seed).seed == seed
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises((RuntimeError, ValueError)):
            torch.Generator().manual_seed(seed)


def test_a_refused_request_leaves_the_engine_exactly_as_it_was(compact, adapters):
    engine = make_engine(compact, adapters, kv_cache_mb=0.05)  # 96 tokens of KV: small enough to overflow
    capacity = engine.scheduler.capacity_tokens
    engine.add_request("waiting", PROMPTS[0], GREEDY, "a0")
    before = state(engine)
    bad_seed = SamplingParams(max_new_tokens=4, temperature=1.0, seed=7)
    object.__setattr__(bad_seed, "seed", 2**64)  # past validation, as a future field might slip through
    refusals = [
        (("bad-seed", PROMPTS[1], bad_seed, "a1"), "seed"),  # the reproduction: 500s until restart
        (("huge", [5] * (capacity + 1), GREEDY, "a1"), "prompt_ids"),  # larger than the whole KV pool
        (("long", [5] * (capacity - 4), GREEDY, None), "max_new_tokens"),  # fits, but not with its budget
        (("float-ids", [5, 1.5], GREEDY, None), "prompt_ids"),
        (("out-of-vocab", [compact.shape.vocab_size], GREEDY, None), "prompt_ids"),
        (("bad-adapter", PROMPTS[1], GREEDY, 7), "adapter"),
    ]
    for args, param in refusals:
        with pytest.raises(InvalidRequest) as error:
            engine.add_request(*args)
        assert error.value.param == param, args[0]
        assert state(engine) == before, args[0]
    with pytest.raises(AdapterNotFound):
        engine.add_request("nope", PROMPTS[1], GREEDY, "nope")
    assert state(engine) == before
    tokens, errors = drive(engine, {"good": (None, PROMPTS[2], GREEDY)})
    assert not errors and tokens["good"] == alone(compact, adapters, {"good": (None, PROMPTS[2], GREEDY)})["good"]
    assert tokens["waiting"] == alone(compact, adapters, {"waiting": ("a0", PROMPTS[0], GREEDY)})["waiting"]


def test_the_generator_answers_every_engine_refusal_with_request_rejected(model_cache):
    from lorafleet.serving.generation.engine_generator import EngineGenerator

    loaded = load_base_model(BASE, model_cache)
    generator = EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=0.05, adapter_slots=1, max_lora_rank=8),
                                eos_token_ids=frozenset({EOS}))
    capacity = generator.engine.scheduler.capacity_tokens

    async def submit(prompt: list[int], **params) -> list[int]:
        stream = generator.submit(GenerationRequest(tuple(prompt), ApiSampling(**{"max_tokens": 4, **params})))
        return [token async for token in stream]

    try:
        for prompt, params, param in [
            ([5, 6], {"temperature": 1.0, "seed": 2**64}, "seed"),
            ([5] * (capacity + 1), {"temperature": 0.0}, "prompt"),
            ([5] * (capacity - 2), {"temperature": 0.0}, "max_tokens"),
            ([5, 6], {"temperature": 0.0, "stop_token_ids": (-3,)}, "stop"),
        ]:
            with pytest.raises(RequestRejected) as error:
                asyncio.run(submit(prompt, **params))
            assert error.value.param == param
        assert len(asyncio.run(submit([5, 6], temperature=1.0, seed=SEED_MAX))) == 4  # still serving
    finally:
        generator.close()


# ----- A2: a non-finite slot cannot reach another row ---------------------------------------------------
def poison(slots: LoraSlots, slot: int, value: float = float("nan")) -> None:
    """Write `value` into every A and B of `slot` in place: what overflow or a bypassed check would leave."""
    for layer in range(slots.shape.num_layers):
        for module in slots.targets(slot):
            a, b = slots.stacks(layer, module)  # views of the slot tensors
            a[slot].fill_(value)
            b[slot].fill_(value)


@pytest.fixture(scope="module")
def tiny_model() -> CompactLlama:
    return CompactLlama.from_hf(tiny_hf(seed=3))


def three_slots(model: CompactLlama) -> LoraSlots:
    slots = LoraSlots(model.shape, num_slots=3, max_rank=4)
    for slot, modules in ((1, ("q_proj", "v_proj", "down_proj")), (2, ("q_proj", "o_proj", "gate_proj")),
                          (3, ("k_proj", "up_proj", "down_proj"))):
        slots.load(slot, random_lora(model.shape, 4, modules, seed=slot))
    return slots


@pytest.mark.parametrize("path", ["auto", "segmented", "padded", "dense"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_slot_never_reaches_another_row_on_any_lora_path(tiny_model, path, value):
    """Slot 2 holds NaN/Inf and its rows' inputs are NaN too; every other row's delta is bit-identical to
    the same batch with slot 2 finite. Row 0 is a bystander and slot 2 has fewer rows than slot 1, so
    padding exists in slot 2's group (the old padded path added its NaN back into row 0)."""
    ids = torch.tensor([0, 1, 1, 2, 1, 3, 0, 3])
    clean, bad = three_slots(tiny_model), three_slots(tiny_model)
    poison(bad, 2, value)
    if path == "dense":  # dense would multiply every row by every slot: refused for mixed rows
        with pytest.raises(ValueError, match="one adapter slot"):
            bad.route(ids, path=path)
        one = torch.full((4,), 2)
        assert bad.route(one, path=path).runs is None  # one adapter alone: no other row to reach
        return
    bystanders = ids != 2
    generator = torch.Generator().manual_seed(0)
    for group, (module, width) in {"qkv": ("q_proj", 64), "o": ("o_proj", 64), "gate_up": ("gate_proj", 64),
                                   "down": ("down_proj", tiny_model.shape.intermediate_size)}.items():
        x = torch.randn(len(ids), width, generator=generator)
        x_bad = x.clone()
        x_bad[~bystanders] = value  # the bad rows' activations are garbage by now
        outs = []
        for slots, inputs in ((clean, x), (bad, x_bad)):
            routing = slots.route(ids, path=path)
            out = torch.zeros(len(ids), slots._bt[group].shape[-1])
            outs.append(slots.apply(0, group, inputs, out, routing))
        assert torch.equal(outs[0][bystanders], outs[1][bystanders]), (group, path)
        assert outs[0][bystanders].abs().sum() > 0 or group == "o"  # the adapters really add something


class ForcedPath(LoraSlots):
    """LoRA slots whose model-level routing always takes one path (the cost model would pick per batch)."""

    path = "auto"

    def route(self, adapter_ids, **kwargs):
        return super().route(adapter_ids, path=self.path)


@pytest.mark.parametrize("path", ["auto", "segmented", "padded"])
def test_a_nan_slot_leaves_other_sequences_logits_bit_identical_through_the_model(tiny_model, path):
    """Whole forwards (prefill, then decodes at unequal contexts) of four sequences, one on a NaN slot:
    every other sequence's logits are bit-identical to the same batch with that slot finite."""
    feeds = [([5, 6, 7, 8, 9], 1), ([10, 11, 12], 2), (list(range(20, 29)), 0), ([30, 31, 32, 33], 3)]
    blocks = [[0, 1], [2], [3, 4, 5], [6, 7]]  # the NaN sequence (slot 2) owns block 2
    results = []
    for poisoned in (False, True):
        slots = ForcedPath(tiny_model.shape, num_slots=3, max_rank=4)
        slots.path = path
        for slot in (1, 2, 3):
            slots.load(slot, random_lora(tiny_model.shape, 4, ("q_proj", "o_proj", "down_proj"), seed=slot))
        if poisoned:
            poison(slots, 2)
        kv = tiny_model.new_kv_pool(8, 4)
        starts, out = [0] * len(feeds), []
        chunks = [[tokens for tokens, _ in feeds], [[40 + i] for i in range(len(feeds))]]
        for chunk in chunks:
            batch = ForwardBatch.build(chunk, starts, blocks, 4, [slot for _, slot in feeds])
            out.append(tiny_model.logits(tiny_model(batch, kv, slots)).split(batch.query_lens))
            starts = [start + len(tokens) for start, tokens in zip(starts, chunk)]
        results.append(out)
    for clean, dirty in zip(*results):
        assert not torch.isfinite(dirty[1]).all()  # the NaN adapter's own sequence is garbage...
        for b in (0, 2, 3):  # ...and nobody else's is touched, to the bit
            assert torch.equal(clean[b], dirty[b]), (path, b)


def test_attention_padding_never_reads_another_sequences_cache(tiny_model):
    """Sequences of different lengths are padded to the longest context; that padding must not read K/V
    it does not own (here block 0 and the tail of a block, full of NaN left by a failed sequence)."""
    model = tiny_model
    results = []
    for stale in (0.0, float("nan")):
        kv = model.new_kv_pool(8, 4)
        kv.k.fill_(stale)
        kv.v.fill_(stale)
        # prefill: lengths 3 and 9 (blocks [1] and [2, 3, 4]), then decodes at unequal contexts
        prefill = ForwardBatch.build([[5, 6, 7], list(range(20, 29))], [0, 0], [[1], [2, 3, 4]], 4, [0, 0])
        first = model.logits(model(prefill, kv))
        decode = ForwardBatch.build([[8], [29]], [3, 9], [[1], [2, 3, 4]], 4, [0, 0])
        results.append((first, model.logits(model(decode, kv))))
    for clean, dirty in zip(*results):
        assert torch.isfinite(dirty).all() and torch.equal(clean, dirty)


def test_a_nan_adapter_fails_alone_and_bystanders_keep_their_answers(compact, adapters):
    engine = make_engine(compact, adapters)
    warm(engine, "a0", "a1", "a2")
    poison(engine.adapters.slots, engine.adapters.slot_of("a2"))
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=11, stop_token_ids=frozenset({EOS}))
    bystanders = {"base": (None, PROMPTS[0], GREEDY), "a0": ("a0", PROMPTS[1], GREEDY),
                  "a1": ("a1", PROMPTS[2], GREEDY), "a1-sampled": ("a1", PROMPTS[3], sampled)}
    tokens, errors = drive(engine, {**bystanders, "nan": ("a2", PROMPTS[0], sampled)})
    assert set(errors) == {"nan"} and "non-finite" in errors["nan"] and "'a2'" in errors["nan"]
    expected = alone(compact, adapters, bystanders)
    assert {name: tokens[name] for name in bystanders} == expected
    again, errors = drive(engine, {"after": ("a0", PROMPTS[1], GREEDY)})  # the engine keeps serving
    assert not errors and again["after"] == expected["a0"]


# ----- A3b: an exception caused by one request fails that request only --------------------------------
class FailingSlots(LoraSlots):
    """LoRA slots whose forward raises whenever a row uses slot `bad` (a bug hit only by one adapter)."""

    bad = -1

    def route(self, adapter_ids, **kwargs):
        if self.bad in adapter_ids.tolist():
            raise RuntimeError(f"injected failure in slot {self.bad}")
        return super().route(adapter_ids, **kwargs)


def test_a_forward_failure_of_one_adapter_fails_only_its_requests(compact, adapters):
    slots = FailingSlots(compact.shape, 4, 8)
    engine = make_engine(compact, adapters, slots=slots)
    warm(engine, "a0", "a1")
    slots.bad = engine.adapters.slot_of("a1")
    bystanders = {"base": (None, PROMPTS[0], GREEDY), "a0": ("a0", PROMPTS[1], GREEDY),
                  "base2": (None, PROMPTS[2], GREEDY)}
    tokens, errors = drive(engine, {**bystanders, "bad": ("a1", PROMPTS[3], GREEDY)})
    assert set(errors) == {"bad"} and "forward pass failed" in errors["bad"] and "injected" in errors["bad"]
    expected = alone(compact, adapters, bystanders)
    assert {name: tokens[name] for name in bystanders} == expected
    assert engine.allocator.num_free() == engine.allocator.num_blocks  # nothing leaked by the failures
    again, errors = drive(engine, {"after": ("a0", PROMPTS[1], GREEDY), "bad2": ("a1", PROMPTS[0], GREEDY)})
    assert set(errors) == {"bad2"} and again["after"] == expected["a0"]


class RaisingHeads(torch.nn.Module):
    """Turbo heads whose forward raises (wrong shapes, a bug): drafting for their rows fails."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, hidden):
        raise RuntimeError("injected heads failure")


def bad_heads_reader(path: Path, shape) -> LoadedAdapter:
    loaded = read_adapter_dir(path, shape)
    return LoadedAdapter(loaded.weights, RaisingHeads()) if path.name == "turbo_bad" else loaded


def test_a_drafting_failure_of_one_adapters_heads_fails_only_its_requests(compact, adapters):
    engine = make_engine(compact, adapters, reader=bad_heads_reader, speculation="on")
    warm(engine, "turbo", "turbo_bad", "a0")
    bystanders = {"turbo": ("turbo", PROMPTS[0], GREEDY), "a0": ("a0", PROMPTS[1], GREEDY),
                  "base": (None, PROMPTS[2], GREEDY)}
    tokens, errors = drive(engine, {**bystanders, "bad": ("turbo_bad", PROMPTS[3], GREEDY)})
    assert set(errors) == {"bad"} and "Turbo heads of adapter 'turbo_bad'" in errors["bad"]
    assert len(tokens["bad"]) == 1  # the prefill's token was delivered with the error
    assert engine.stats.spec_draft_tokens > 0  # the good heads kept drafting
    assert {name: tokens[name] for name in bystanders} == alone(compact, adapters, bystanders)
    again, errors = drive(engine, {"after": ("turbo", PROMPTS[0], GREEDY)})
    assert not errors and again["after"] == tokens["turbo"]


def test_an_adapter_that_stops_resolving_fails_its_waiting_request_only(compact, adapters):
    engine = make_engine(compact, adapters, max_num_seqs=1)  # the second request waits behind the first
    engine.add_request("first", PROMPTS[0], GREEDY, None)
    engine.add_request("orphan", PROMPTS[1], GREEDY, "a0")
    engine.adapters.wait_loading(timeout=60)
    engine.adapters.install_ready()
    assert engine.adapters.unload("a0")  # evicted while waiting, and its name is gone from the catalogue
    del engine.known["a0"]
    tokens, errors = drive(engine, {})
    assert set(errors) == {"orphan"} and "'a0'" in errors["orphan"]
    assert len(tokens["first"]) > 0 and not engine.has_unfinished()


# ----- A2a / A3a: adapter files are checked before they become resident -------------------------------
SECRET = "hunter2-do-not-echo"


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def set_value(name_part: str, index: tuple[int, int], value: float):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[min(k for k in tensors if name_part in k)][index] = value
    return change


def replace_first(make):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[min(tensors)] = make(tensors[min(tensors)])
    return change


def test_lora_files_with_non_finite_or_misshapen_tensors_are_refused_naming_file_and_tensor(
        tmp_path, compact, adapters):
    shape = compact.shape
    for name, change, problem in [
        ("inf", set_value("lora_B", (0, 0), float("inf")), "non-finite"),
        ("nan", set_value("lora_A", (1, 2), float("nan")), "non-finite"),
        ("shape", replace_first(lambda t: torch.zeros(4, 3)), "has shape"),  # from the header, before loading
        ("dtype", replace_first(lambda t: t.to(torch.int32)), "dtype I32"),
    ]:
        folder = Path(shutil.copytree(adapters["a0"], tmp_path / name))
        weights = folder / "adapter_model.safetensors"
        edit_tensors(weights, change)
        with pytest.raises(ValueError, match=problem) as error:
            read_peft_adapter(folder, shape)
        assert str(weights) in str(error.value) and "base_model.model" in str(error.value), name
    slots = LoraSlots(shape, num_slots=1, max_rank=8)
    weights = random_lora(shape, 4, ("q_proj",), seed=1)
    weights.b[(0, "q_proj")][0, 0] = float("nan")  # in memory, past the file reader
    with pytest.raises(ValueError, match="layer 0 q_proj lora_B holds non-finite"):
        slots.load(1, weights)
    huge = random_lora(shape, 4, ("q_proj",), seed=1, scaling=1e39)  # finite, but overflows fp32 once scaled
    with pytest.raises(ValueError, match="overflows"):
        slots.load(1, huge)
    assert slots.targets(1) == frozenset()  # refused before the slot changed


def write_heads_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "turbo_config.json").read_text())
    (folder / "turbo_config.json").write_text(json.dumps({**config, **fields}))


def test_turbo_heads_of_another_base_or_unbounded_size_are_refused_before_allocation(tmp_path, compact, adapters):
    shape = compact.shape
    assert read_adapter_dir(adapters["turbo"], shape).heads is not None
    for name, fields, problem in [
        ("wide", {"hidden_size": 2 * shape.hidden_size}, "hidden_size: is 128 but the base model's is 64"),
        ("vocab", {"vocab_size": shape.vocab_size + 1}, "vocab_size"),
        ("huge", {"hidden_size": 10**6, "block_size": 10**6}, "hidden_size: Input should be less than or equal"),
        ("block", {"block_size": shape.hidden_size + 1}, "block_size"),
    ]:
        folder = Path(shutil.copytree(adapters["turbo"], tmp_path / name))
        write_heads_config(folder, **fields)
        (folder / "turbo_heads.safetensors").unlink()  # refused from the config alone: no tensor is read
        with pytest.raises(ValueError, match=problem) as error:
            read_adapter_dir(folder, shape)
        assert "turbo_config.json" in str(error.value), name


def test_turbo_heads_with_bad_tensors_are_refused_naming_file_and_tensor(tmp_path, compact, adapters):
    def add(name: str, tensor: torch.Tensor):
        return lambda tensors: tensors.update({name: tensor})

    for name, change, problem in [
        ("nan", set_value("heads.1.up", (3, 0), float("nan")), "'heads.1.up.weight' holds non-finite"),
        ("shape", add("heads.0.down.weight", torch.zeros(3, 64)), "'heads.0.down.weight' has shape"),
        ("extra", add("heads.9.up.weight", torch.zeros(64, 64)), "'heads.9.up.weight' is not a weight"),
        ("missing", lambda tensors: tensors.pop("heads.2.up.weight"), "'heads.2.up.weight' is missing"),
    ]:
        folder = Path(shutil.copytree(adapters["turbo"], tmp_path / name))
        weights = folder / "turbo_heads.safetensors"
        edit_tensors(weights, change)
        with pytest.raises(ValueError, match=problem) as error:
            load_heads(folder, hidden_size=compact.shape.hidden_size, vocab_size=compact.shape.vocab_size)
        assert str(weights) in str(error.value), name


def test_config_errors_name_file_and_field_but_never_echo_file_contents(tmp_path, compact, adapters):
    cases = {
        "turbo_field": ("turbo", "turbo_config.json", None, {"num_heads": SECRET}),
        "turbo_extra": ("turbo", "turbo_config.json", None, {"note": SECRET}),
        "turbo_string": ("turbo", "turbo_config.json", json.dumps(SECRET), None),
        "turbo_text": ("turbo", "turbo_config.json", f"password = {SECRET}", None),
        "peft_type": ("a0", "adapter_config.json", None, {"peft_type": SECRET}),
        "peft_rank": ("a0", "adapter_config.json", None, {"r": SECRET}),
        "peft_option": ("a0", "adapter_config.json", None, {"use_dora": SECRET}),
        "peft_text": ("a0", "adapter_config.json", SECRET, None),
    }
    for case, (source, filename, text, fields) in cases.items():
        folder = Path(shutil.copytree(adapters[source], tmp_path / case))
        path = folder / filename
        if fields is not None:
            path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
        else:
            path.write_text(text)
        with pytest.raises(ValueError) as error:
            read_adapter_dir(folder, compact.shape)
        message = str(error.value)
        assert filename in message and SECRET not in message and "hunter2" not in message, (case, message)
