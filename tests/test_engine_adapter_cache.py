"""AdapterCache: on-demand loads, LRU under slot capacity, pins, failures, hot reload.

Most tests use a fake slots object that records what each slot holds (and which thread wrote it) and
a fake reader keyed by folder, optionally gated by an Event so a read can be held "in flight".
Synchronisation is always explicit: `wait_loading` waits on the read futures themselves.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lorafleet.serving.engine.adapter_cache import (
    AdapterCache,
    AdapterLoadError,
    AdapterNotFound,
    LoadedAdapter,
    ResolvedAdapter,
    read_adapter_dir,
)

WAIT_S = 30.0  # upper bound for a fake read; never reached unless something is broken


@dataclass(frozen=True)
class FakeWeights:
    tag: str
    rank: int = 4


class FakeSlots:
    """Records the adapter tag per slot; a copy can fail halfway to check nothing half-written stays."""

    def __init__(self, num_slots: int, max_rank: int = 8) -> None:
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, "cpu"
        self.content: dict[int, str | None] = {slot: None for slot in range(1, num_slots + 1)}
        self.writers: set[int] = set()

    def load(self, slot: int, weights: FakeWeights) -> None:
        assert 1 <= slot <= self.num_slots
        self.writers.add(threading.get_ident())
        self.content[slot] = f"half of {weights.tag}"
        if weights.tag.endswith(":explode"):
            raise RuntimeError("device out of memory")
        self.content[slot] = weights.tag

    def clear(self, slot: int) -> None:
        self.writers.add(threading.get_ident())
        self.content[slot] = None


class FakeRegistry:
    """Resolver + reader: name -> (identity, folder); folder -> what reading it gives."""

    def __init__(self) -> None:
        self.names: dict[str, ResolvedAdapter] = {}
        self.folders: dict[Path, LoadedAdapter | Exception] = {}
        self.gates: dict[Path, threading.Event] = {}
        self.reads: list[Path] = []

    def add(self, name: str, identity: str, *, rank: int = 4, heads: object | None = None,
            lora: bool = True, error: Exception | None = None) -> ResolvedAdapter:
        path = Path("/adapters") / name / identity
        self.names[name] = ResolvedAdapter(name=name, identity=identity, path=path)
        weights = FakeWeights(tag=f"{name}:{identity}", rank=rank) if lora else None
        self.folders[path] = error or LoadedAdapter(weights=weights, heads=heads)  # type: ignore[arg-type]
        return self.names[name]

    def resolve(self, name: str) -> ResolvedAdapter:
        if name not in self.names:
            raise AdapterNotFound(f"no adapter named {name!r}")
        return self.names[name]

    def read(self, path: Path, shape: object) -> LoadedAdapter:
        if path in self.gates:
            assert self.gates[path].wait(WAIT_S), "test gate never opened"
        self.reads.append(path)
        result = self.folders[path]
        if isinstance(result, Exception):
            raise result
        return result


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


MakeCache = Callable[..., tuple[AdapterCache, FakeSlots]]


@pytest.fixture
def make_cache(registry: FakeRegistry) -> Iterator[MakeCache]:
    """Caches over the fake registry, closed after the test (their reader threads stopped)."""
    made: list[AdapterCache] = []

    def make(num_slots: int, **kwargs) -> tuple[AdapterCache, FakeSlots]:
        slots = FakeSlots(num_slots)
        made.append(AdapterCache(slots, None, registry.resolve, reader=registry.read, **kwargs))
        return made[-1], slots

    yield make
    for cache in made:
        cache.close()
    

def settle(cache: AdapterCache) -> list[str]:
    assert cache.wait_loading(WAIT_S)
    return cache.install_ready()


def load(cache: AdapterCache, *names: str) -> None:
    for name in names:
        assert cache.request(name) is None
    assert settle(cache) == list(names)


def test_miss_loads_in_background_then_hits(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    cache, slots = make_cache(2)
    gate = registry.gates[registry.names["a"].path] = threading.Event()

    assert cache.request("a") is None  # returns at once although the read is held
    assert cache.request("a") is None  # asking again while reading: neither hit nor miss
    assert cache.install_ready() == [] and cache.slot_of("a") is None
    gate.set()
    assert settle(cache) == ["a"]

    assert cache.request("a") == 1 and slots.content[1] == "a:v1"
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.loads, stats.evictions, stats.failures) == (1, 1, 1, 0, 0)
    assert len(stats.load_ms) == 1 and stats.load_ms[0] >= 0
    assert slots.writers == {threading.get_ident()}  # slot tensors written on the caller's thread only
    assert registry.reads == [registry.names["a"].path]


def test_unknown_adapter_raises_synchronously(registry: FakeRegistry, make_cache: MakeCache) -> None:
    cache, _ = make_cache(2)
    with pytest.raises(AdapterNotFound, match="nope"):
        cache.request("nope")
    assert cache.stats.misses == 0 and cache.install_ready() == [] and cache.resident() == []


def test_lru_evicts_the_least_recently_used(registry: FakeRegistry, make_cache: MakeCache) -> None:
    for name in "abc":
        registry.add(name, "v1")
    cache, slots = make_cache(2)
    load(cache, "a", "b")
    assert cache.resident() == ["a", "b"]
    assert cache.request("a") == 1  # touch: b is now least recently used
    load(cache, "c")
    assert cache.resident() == ["a", "c"] and cache.slot_of("b") is None
    assert cache.slot_of("c") == 2 and slots.content == {1: "a:v1", 2: "c:v1"}
    assert cache.stats.evictions == 1 and cache.stats.loads == 3


def test_pinned_adapters_are_never_evicted(registry: FakeRegistry, make_cache: MakeCache) -> None:
    for name in "abc":
        registry.add(name, "v1")
    cache, slots = make_cache(2)
    load(cache, "a", "b")
    cache.pin("a")
    cache.pin("b")
    cache.pin("b")  # two sequences run on b
    assert cache.request("c") is None
    assert settle(cache) == []  # read done, but every slot is pinned: it waits
    assert cache.resident() == ["a", "b"] and cache.stats.evictions == 0
    cache.unpin("b")
    assert cache.install_ready() == []  # b still has one user
    cache.unpin("a")
    assert cache.install_ready() == ["c"]
    assert cache.resident() == ["b", "c"] and slots.content == {1: "c:v1", 2: "b:v1"}
    assert cache.stats.evictions == 1
    cache.unpin("b")
    with pytest.raises(ValueError, match="without a matching pin"):
        cache.unpin("b")


def test_loads_done_together_never_evict_each_other(registry: FakeRegistry, make_cache: MakeCache) -> None:
    for name in "abcd":
        registry.add(name, "v1")
    cache, _ = make_cache(2)
    load(cache, "a")
    cache.pin("a")
    for name in "bcd":
        assert cache.request(name) is None
    assert settle(cache) == ["b"]  # c may not evict b, installed by this same call
    assert cache.install_ready() == ["c"]  # next step: b is the LRU unpinned one
    assert cache.install_ready() == ["d"]
    assert cache.resident() == ["a", "d"]


def test_failed_read_error_names_adapter_and_folder(registry: FakeRegistry, make_cache: MakeCache) -> None:
    resolved = registry.add("bad", "v1", error=FileNotFoundError("adapter_config.json is missing"))
    registry.add("good", "v1")
    cache, slots = make_cache(1)
    assert cache.request("bad") is None
    assert settle(cache) == []
    error = cache.error("bad")
    assert isinstance(error, AdapterLoadError)
    assert "'bad'" in str(error) and str(resolved.path) in str(error) and "adapter_config.json" in str(error)
    assert cache.stats.failures == 1 and cache.resident() == [] and slots.content == {1: None}
    assert slots.writers == set()  # nothing written for a failed read

    registry.folders[resolved.path] = LoadedAdapter(weights=FakeWeights("bad:v1"), heads=None)  # fixed
    assert cache.request("bad") is None and cache.error("bad") is None  # a new request retries
    assert settle(cache) == ["bad"] and cache.stats.misses == 2


def test_rank_too_big_fails_before_anything_is_evicted(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    registry.add("big", "v1", rank=64)
    cache, slots = make_cache(1)
    load(cache, "a")
    assert cache.request("big") is None
    assert settle(cache) == []
    assert "rank 64 exceeds" in str(cache.error("big")) and "'big'" in str(cache.error("big"))
    assert cache.resident() == ["a"] and slots.content == {1: "a:v1"} and cache.stats.evictions == 0


def test_failed_copy_leaves_no_half_written_slot(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("boom", "explode")  # FakeSlots.load raises halfway through this one
    registry.add("ok", "v1")
    cache, slots = make_cache(1)
    assert cache.request("boom") is None
    assert settle(cache) == []
    assert slots.content == {1: None}, "the failed copy's slot must be cleared"
    error = cache.error("boom")
    assert isinstance(error, AdapterLoadError) and "slot 1" in str(error) and "out of memory" in str(error)
    assert str(registry.names["boom"].path) in str(error)
    assert cache.resident() == [] and cache.stats.failures == 1
    load(cache, "ok")  # the slot is free again
    assert slots.content == {1: "ok:v1"}


def test_refresh_reloads_a_changed_identity_in_place(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    registry.add("b", "v1")
    cache, slots = make_cache(2)
    load(cache, "a", "b")
    assert cache.refresh() == []  # nothing changed
    registry.add("a", "v2")
    gate = registry.gates[registry.names["a"].path] = threading.Event()
    assert cache.refresh() == ["a"]
    assert cache.refresh() == []  # the same reload is not started twice
    assert cache.request("a") == 1 and slots.content[1] == "a:v1"  # the old version serves meanwhile
    gate.set()
    assert settle(cache) == ["a"]
    assert cache.request("a") == 1 and slots.content == {1: "a:v2", 2: "b:v1"}
    assert cache.stats.loads == 3 and cache.stats.evictions == 0 and cache.stats.misses == 2


def test_refresh_waits_until_the_adapter_is_unpinned(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    cache, slots = make_cache(1)
    load(cache, "a")
    cache.pin("a")  # a running request must keep consistent weights
    registry.add("a", "v2")
    assert cache.refresh() == ["a"]
    assert settle(cache) == [] and slots.content == {1: "a:v1"}
    cache.unpin("a")
    assert cache.install_ready() == ["a"] and slots.content == {1: "a:v2"}


def test_failed_reload_keeps_the_old_version_serving(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    cache, slots = make_cache(1)
    load(cache, "a")
    registry.add("a", "v2", error=ValueError("DoRA is not supported"))
    assert cache.refresh() == ["a"]
    assert settle(cache) == []
    assert cache.slot_of("a") == 1 and slots.content == {1: "a:v1"}
    assert cache.error("a") is None  # nobody waits on it: the engine must not fail a's requests
    assert cache.stats.failures == 1
    assert cache.refresh() == []  # the same broken version is not retried every poll
    registry.add("a", "v3")
    assert cache.refresh() == ["a"] and settle(cache) == ["a"] and slots.content == {1: "a:v3"}


def test_evicting_an_adapter_drops_its_pending_reload(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    registry.add("c", "v1")
    cache, slots = make_cache(1)
    load(cache, "a")
    assert cache.request("c") is None  # c's read is queued before a's reload
    registry.add("a", "v2", error=OSError("disk gone"))
    assert cache.refresh() == ["a"]
    assert settle(cache) == ["c"]  # c evicts a; a's (failed) reload was for an adapter now gone
    assert cache.resident() == ["c"] and slots.content == {1: "c:v1"}
    assert cache.error("a") is None and cache.stats.failures == 0 and cache.install_ready() == []


def test_refresh_keeps_names_the_resolver_forgot(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    cache, _ = make_cache(1)
    load(cache, "a")
    del registry.names["a"]
    assert cache.refresh() == [] and cache.resident() == ["a"]


def test_unload_refuses_pinned_and_defers_clearing(registry: FakeRegistry, make_cache: MakeCache) -> None:
    registry.add("a", "v1")
    registry.add("b", "v1")
    cache, slots = make_cache(2)
    load(cache, "a")
    cache.pin("a")
    assert cache.unload("a") is False and cache.resident() == ["a"]
    cache.unpin("a")
    assert cache.unload("a") is True and cache.resident() == [] and cache.slot_of("a") is None
    assert slots.content[1] == "a:v1"  # unload only marks the slot free ...
    assert cache.install_ready() == [] and slots.content[1] is None  # ... the step loop clears it
    assert cache.unload("a") is False and cache.unload("never") is False

    gate = registry.gates[registry.names["b"].path] = threading.Event()
    assert cache.request("b") is None
    assert cache.unload("b") is True  # unloading a load in flight discards it
    gate.set()
    assert settle(cache) == [] and cache.resident() == [] and cache.error("b") is None


def test_heads_only_adapters_take_no_slot(registry: FakeRegistry, make_cache: MakeCache) -> None:
    heads_1, heads_2 = object(), object()
    registry.add("t1", "v1", lora=False, heads=heads_1)
    registry.add("t2", "v1", lora=False, heads=heads_2)
    registry.add("a", "v1")
    cache, slots = make_cache(1)
    load(cache, "t1", "a")
    assert cache.request("t1") == 0 and cache.heads("t1") is heads_1  # base model + its heads
    assert cache.request("a") == 1 and cache.heads("a") is None and slots.content == {1: "a:v1"}
    load(cache, "t2")  # one heads-only entry per slot: t1 goes, a (a LoRA slot) stays
    assert cache.resident() == ["a", "t2"] and cache.heads("t1") is None and cache.stats.evictions == 1


def test_100_adapters_through_4_slots(registry: FakeRegistry, make_cache: MakeCache) -> None:
    names = [f"adapter-{i:03d}" for i in range(100)]
    for name in names:
        registry.add(name, f"id-{name}")
    cache, slots = make_cache(4, max_workers=2)
    pinned = {"adapter-000", "adapter-001"}  # two long-running requests hold these throughout
    load(cache, *sorted(pinned))
    for name in pinned:
        cache.pin(name)
    order = names * 3
    random.Random(0).shuffle(order)
    for name in order:
        slot = cache.request(name)
        if slot is None:
            assert settle(cache) == [name]
            slot = cache.request(name)
        assert slot is not None and slots.content[slot] == f"{name}:id-{name}"
        resident = cache.resident()
        assert len(resident) <= 4 and pinned <= set(resident) and resident[-1] == name
        assert len({cache.slot_of(n) for n in resident}) == len(resident)  # one adapter per slot
    stats = cache.stats
    assert stats.loads == stats.misses and stats.evictions == stats.loads - 4 and stats.failures == 0
    assert stats.misses > 100 and stats.hits == len(order)  # each miss is asked once more after install


def test_concurrent_requests_during_installs(registry: FakeRegistry, make_cache: MakeCache) -> None:
    names = [f"n{i}" for i in range(12)]
    for name in names:
        registry.add(name, "v1")
    cache, slots = make_cache(3, max_workers=2)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                cache.request(rng.choice(names))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        cache.install_ready()
        cache.wait_loading(0.01)  # bounded poll: the clients finish on their own
    for thread in threads:
        thread.join(WAIT_S)
    settle(cache)
    settle(cache)
    assert errors == []
    resident = cache.resident()
    assert 0 < len(resident) <= 3
    for name in resident:
        assert slots.content[cache.slot_of(name)] == f"{name}:v1"
    assert slots.writers == {threading.get_ident()}


def test_default_reader_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_adapter_dir(tmp_path / "missing", shape=None)
    with pytest.raises(FileNotFoundError, match="neither PEFT LoRA files"):
        read_adapter_dir(tmp_path, shape=None)


# ----- real PEFT adapter directories, real LoraSlots ---------------------------------------------------


def _peft_deltas(peft_model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT is the oracle: each adapted projection's output minus its base layer's, on layer 0."""
    layer = peft_model.base_model.model.model.layers[0]
    modules = {"q_proj": layer.self_attn.q_proj, "v_proj": layer.self_attn.v_proj,
               "up_proj": layer.mlp.up_proj}
    with torch.no_grad():
        return {name: module(x) - module.base_layer(x) for name, module in modules.items()}


def _save(peft_model, loaded, folder: Path, *, seed: int | None, method: str = "lora", heads=None) -> Path:
    from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo
    from lorafleet.models.lora import save_adapter

    if seed is not None:  # PEFT starts B at zero: random A and B make every adapter distinct
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    manifest = AdapterManifest(name=folder.name, method=method, tokenizer_hash="t", task=TaskInfo(name="t"),
                               base_model=BaseModelRef(id=loaded.resolved.model_id,
                                                       revision=loaded.resolved.revision))
    return save_adapter(peft_model, folder, manifest, heads=heads)


def test_real_peft_directories_through_real_slots(model_cache: Path, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    from lorafleet.models.base import load_base_model
    from lorafleet.models.lora import LoraSettings, apply_lora
    from lorafleet.models.turbo_heads import TurboHeads, new_heads
    from lorafleet.serving.engine.lora_slots import LoraSlots
    from lorafleet.serving.engine.model import LlamaShape

    loaded = load_base_model("tiny-random-llama", model_cache)
    shape = LlamaShape.from_hf_config(loaded.model.config)
    turbo = _save(None, loaded, tmp_path / "turbo", seed=None, method="turbo",
                  heads=new_heads(loaded.model, num_heads=2, block_size=8))
    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))
    peft_model = apply_lora(loaded.model, settings)
    x = torch.randn(3, shape.hidden_size, generator=torch.Generator().manual_seed(0))  # (N, d)
    folder_a = _save(peft_model, loaded, tmp_path / "a", seed=1)
    expected_a = _peft_deltas(peft_model, x)
    folder_b = _save(peft_model, loaded, tmp_path / "b", seed=2)
    expected_b = _peft_deltas(peft_model, x)
    big_model = apply_lora(load_base_model("tiny-random-llama", model_cache).model, LoraSettings(r=16))
    folder_big = _save(big_model, loaded, tmp_path / "big", seed=3)

    where = {"a": folder_a, "b": folder_b, "big": folder_big, "turbo": turbo}
    identity = dict.fromkeys(where, "v1")

    def resolve(name: str) -> ResolvedAdapter:
        if name not in where:
            raise AdapterNotFound(name)
        return ResolvedAdapter(name=name, identity=identity[name], path=where[name])

    slots = LoraSlots(shape, num_slots=1, max_rank=8)
    cache = AdapterCache(slots, shape, resolve)
    request.addfinalizer(cache.close)
    ids = torch.ones(3, dtype=torch.long)  # every row on slot 1

    def assert_slot_holds(expected: dict[str, torch.Tensor]) -> None:
        for module, delta in expected.items():
            torch.testing.assert_close(slots.delta(0, module, x, ids), delta, rtol=1e-4, atol=1e-5)
        assert slots.delta(0, "k_proj", x, ids) is None  # not a target of these adapters

    assert cache.request("a") is None and settle(cache) == ["a"] and cache.request("a") == 1
    assert_slot_holds(expected_a)
    assert cache.request("turbo") is None and settle(cache) == ["turbo"]
    assert cache.request("turbo") == 0 and isinstance(cache.heads("turbo"), TurboHeads)  # heads on the base
    assert cache.heads("turbo").num_heads == 2 and cache.heads("a") is None

    assert cache.request("b") is None and settle(cache) == ["b"]  # one slot: a is evicted
    assert cache.resident() == ["turbo", "b"] and cache.stats.evictions == 1
    assert_slot_holds(expected_b)

    assert cache.request("big") is None and settle(cache) == []
    message = str(cache.error("big"))
    assert "'big'" in message and str(folder_big) in message and "rank 16" in message
    assert cache.slot_of("b") == 1
    assert_slot_holds(expected_b)  # the refused adapter evicted nothing and wrote nothing

    where["b"], identity["b"] = folder_a, "v2"  # the registry moves b's alias to a's weights
    assert cache.refresh() == ["b"] and settle(cache) == ["b"] and cache.slot_of("b") == 1
    assert_slot_holds(expected_a)
    assert cache.stats.failures == 1 and cache.stats.loads == 4
