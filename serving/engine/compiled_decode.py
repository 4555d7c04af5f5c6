"""The decode step as one compiled graph (torch.compile, Inductor's CPU backend): fewer ops per token.

Why: at batch 1 a decode step of the embedded SmolLM2 is ~600 small ops (norms, RoPE, casts, KV reads,
SwiGLU) around 120 matmuls, and on this CPU their dispatch costs as much as the matmuls themselves
(int4: ~3.4 ms of kernels in a ~12 ms step, docs/performance.md). Compiled, the ops between the
matmuls fuse into a few C++ loops and the 30 layers run as one call (int4, measured: 12.4 -> 9.3 ms
for the forward, 13.9 -> 11.7 ms per token in `bench weights`).

What is compiled: pure decode forwards (every row feeds one token; `AttentionPlan.decode`) of the base
model (and of Turbo heads on the bare base, whose rows use no LoRA). Prefill chunks, speculative
verification and every forward with LoRA rows keep the eager path, whose attention and LoRA routing
handle any layout. LoRA inside the graph was built and measured: with the adapter's module set in the
graph, each new set compiled on its first request and stalled every request ~75 s; with every group
in one graph (untargeted stacks are zeros), a batch-1 ViGGO adapter decoded at 45.5 ms/token against
42-44 eager (docs/performance.md). Neither is worth having.

The compiled step is functional: it reads K/V through the context slots, takes each row's new K/V in
place of the slot it is about to fill, and returns the new K/V of every layer, which the caller writes
with one `index_copy_` per pool (a graph that mutated the KV pool would copy it).

Costs, stated where they are paid:
* Compiling needs a C++ compiler at run time (`g++`, or `$CXX`); `check_compiler` says so at startup.
  Inductor caches compiled graphs on disk, so a restart compiles faster (SmolLM2 on 2 cores: ~1.5
  min per variant cold, ~15 s warm). Variants: one row and several rows (always masked), per thread
  count below; `warm_up` compiles them all at startup, so no request waits for a compile.
* A graph bakes in the thread count it was compiled with (PyTorch guards on it and recompiles when it
  changes: 44 s here). Graphs are compiled for all threads and for one fewer, the count thread tuning
  moves to when another process takes a core (pinned at all threads, int4 decode beside a busy loop ran
  at 40-52 ms/token against the tuned eager engine's 18-22); a step at any other count runs at all
  threads. The warm-up compiles all four variants (two row counts, two thread counts).
* Sizes that change between steps are marked dynamic (`_mark_dynamic`); weights are graph inputs whose
  guards are dropped (`_guard_filter`): they are frozen at load, and a model's `_structure` stands in
  for them, so two models of one shape but other projection kinds never share a graph.
Any failure to compile or run disables the compiled step for the process and reruns the forward on
the eager path: a compiler problem costs speed, never a request.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorafleet.serving.engine.attention import AttentionPlan, ForwardBatch, apply_rope

if TYPE_CHECKING:
    from lorafleet.serving.engine.kv_cache import KVPool
    from lorafleet.serving.engine.model import CompactLlama, LlamaShape

__all__ = ["CompiledDecode", "check_compiler"]

log = logging.getLogger(__name__)
_FROZEN_ARG = "layers"  # the argument whose guards are dropped (see `_guard_filter`)


def check_compiler() -> None:
    """Inductor's CPU backend compiles C++ at run time: refuse early, naming what is missing."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise ValueError(f"compile_decode needs a C++ compiler at run time and {compiler!r} is not on PATH "
                         f"(install g++, e.g. `apt-get install g++`, or set CXX); or turn compile_decode off")


def _guard_filter(entries: Sequence[Any]) -> list[bool]:
    """Keep every guard except those on the layers' frozen weights (hundreds of tensors checked per
    call: measured ~0.5 ms of a 9 ms step). What those guards would have told apart is guarded another
    way: the shape by the step's closure constants and the hidden states, the projection kinds and
    dtype by `structure`."""
    frozen = (f"{_FROZEN_ARG}[", f"{_FROZEN_ARG}.")
    return [not (entry.name == _FROZEN_ARG or entry.name.startswith(frozen)) for entry in entries]


def make_decode_step(shape: LlamaShape) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The uncompiled step for one model shape: its sizes are closure constants, so the compiled graph
    specialises on them (the arguments are tensors and the structure, guarded as such)."""
    heads, kv_heads, dim, inter, eps = (shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                        shape.intermediate_size, shape.rms_norm_eps)

    def decode_step(structure: str, layers: Sequence[Any], final_norm: torch.Tensor, h: torch.Tensor,
                    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, context_slots: torch.Tensor,
                    mask: torch.Tensor | None, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer for B single-token rows: final-normed hidden (B, d) and new K, V (L, B, KVH, D).

        `structure` (see `_structure`) is guarded by value: since guards on `layers` are dropped, it is
        what keeps two models of one shape but different projection kinds off each other's graphs.
        Same arithmetic as `DecoderLayer.forward` with the decode plan and no LoRA."""
        batch = h.shape[0]
        fresh = (context_slots == slots[:, None])[:, :, None, None]  # (B, C, 1, 1): the slot each row fills
        flat_context = context_slots.reshape(-1)
        new_k, new_v = [], []
        for index, layer in enumerate(layers):
            x = F.rms_norm(h, h.shape[-1:], layer.input_norm, eps)
            qkv = layer.qkv(x, layer.qkv_bias)  # (B, (H+2KVH)*D)
            qk = apply_rope(qkv[:, : (heads + kv_heads) * dim].view(batch, heads + kv_heads, dim), cos, sin)
            k_now, v_now = qk[:, heads:], qkv[:, (heads + kv_heads) * dim:].view(batch, kv_heads, dim)
            cached_k = k_pool[index].index_select(0, flat_context).view(batch, -1, kv_heads, dim)  # (B, C, KVH, D)
            cached_v = v_pool[index].index_select(0, flat_context).view(batch, -1, kv_heads, dim)
            k, v = torch.where(fresh, k_now[:, None], cached_k), torch.where(fresh, v_now[:, None], cached_v)
            q = qk[:, :heads].reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, KVH, G, D)
            attn = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                                  scale=dim ** -0.5).reshape(batch, heads * dim)
            h = layer.o.add_to(h, attn)
            x = F.rms_norm(h, h.shape[-1:], layer.post_norm, eps)
            gate_up = layer.gate_up(x)
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            h = layer.down.add_to(h, act)
            new_k.append(k_now)
            new_v.append(v_now)
        return F.rms_norm(h, h.shape[-1:], final_norm, eps), torch.stack(new_k), torch.stack(new_v)

    return decode_step


def _structure(model: CompactLlama) -> str:
    """What the graph's code depends on besides the shape: each projection's kind and whether it is
    prepacked, q/k/v biases, the dtype. Weights' values are inputs; this is everything else."""
    kinds = []
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            projection = getattr(layer, name)
            kinds.append(f"{type(projection).__name__}{'/packed' if getattr(projection, 'prepacked', False) else ''}")
        kinds.append("bias" if layer.qkv_bias is not None else "-")
    return f"{model.norm.dtype}|{model.norm.device.type}|{','.join(kinds)}"


def _mark_dynamic(hidden: torch.Tensor, plan: AttentionPlan, kv: KVPool, mask: torch.Tensor | None) -> None:
    """The sizes that change between steps (rows, context length, pool size) are symbolic in the graph;
    everything else, the weights above all, is static (all-dynamic shapes defeat the prepacked
    oneDNN weights' lowering). A batch of one row still gets its own specialised graph."""
    marks: list[tuple[torch.Tensor | None, tuple[int, ...]]] = [
        (hidden, (0,)), (plan.slot_mapping, (0,)), (plan.context_slots, (0, 1)), (plan.cos, (0,)),
        (plan.sin, (0,)), (mask, (0, 3)), (kv.k, (1,)), (kv.v, (1,))]
    for tensor, dims in marks:
        if tensor is not None:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


class CompiledDecode:
    """The compiled decode step of one CompactLlama (see the module docstring)."""

    def __init__(self, model: CompactLlama, *, compile_fn: Callable[..., Any] | None = None) -> None:
        """`compile_fn` replaces torch.compile (tests run the same step uncompiled to check its arithmetic)."""
        if compile_fn is None:
            check_compiler()
        self.model = model
        self.structure = _structure(model)
        self.threads = torch.get_num_threads()  # the count a step runs at when its own has no graph
        # Graphs are compiled for these counts (see the module docstring): all threads, and one fewer, the
        # count thread tuning moves to when one other process takes a core.
        self.thread_counts = sorted({self.threads, max(1, self.threads - 1)})
        compile_fn = compile_fn or (lambda fn: torch.compile(fn, options={"guard_filter_fn": _guard_filter}))
        self._step = compile_fn(make_decode_step(model.shape))
        self.disabled: str | None = None  # why the compiled step was turned off, once it was
        self.calls = 0

    def warm_up(self) -> None:
        """Compile every variant now (one row and several rows, at each of `thread_counts`), so no
        request waits for a compile. Runs on a scratch KV pool; raises, naming the cause, if compiling
        fails."""
        # a normal tensor, as the engine's pool is (an inference tensor would compile another graph)
        kv = self.model.new_kv_pool(4, 4)
        contexts = [[3, 1, 4, 1, 5], [9, 2, 6]]  # two rows of different lengths: the masked variant
        saved = torch.get_num_threads()
        try:
            for threads in self.thread_counts:
                torch.set_num_threads(threads)
                for rows in (contexts[:1], contexts):
                    self._warm_up_one(kv, rows)
        finally:
            torch.set_num_threads(saved)

    @torch.inference_mode()  # as the engine's forwards: grad mode would be another graph
    def _warm_up_one(self, kv: KVPool, rows: list[list[int]]) -> None:
        batch = ForwardBatch.build([[row[-1]] for row in rows], [len(row) - 1 for row in rows],
                                   [[2 * b, 2 * b + 1] for b in range(len(rows))], 4, [0] * len(rows),
                                   device=kv.device)
        plan = AttentionPlan(batch, self.model.shape, self.model.rope)
        hidden = F.embedding(batch.input_ids, self.model.embed_tokens.weight)
        if self(hidden, plan, kv) is None:
            raise RuntimeError(f"compile_decode could not compile the decode step: {self.disabled}")

    def takes(self, plan: Any, routing: Any) -> bool:
        """Whether this forward is a compiled one: single-token rows of the base model (no LoRA routing)."""
        return self.disabled is None and routing is None and isinstance(plan, AttentionPlan) and plan.decode

    def __call__(self, hidden: torch.Tensor, plan: AttentionPlan, kv: KVPool) -> torch.Tensor | None:
        """Final-normed hidden states (B, d) with K/V written, or None when the compiled step failed
        (it is then disabled; the caller runs the eager path, which rewrites the same K/V)."""
        mask = plan.mask
        if mask is None and hidden.shape[0] > 1:  # equal contexts: an all-true mask, not a third variant
            mask = torch.ones(hidden.shape[0], 1, 1, plan.context_slots.shape[1], dtype=torch.bool,
                              device=hidden.device)
        _mark_dynamic(hidden, plan, kv, mask)
        saved = torch.get_num_threads()
        try:
            if saved not in self.thread_counts:  # no graph for this count: run at the count compiled for
                torch.set_num_threads(self.threads)
            out, new_k, new_v = self._step(self.structure, self.model.layers, self.model.norm, hidden, kv.k,
                                           kv.v, plan.slot_mapping, plan.context_slots, mask, plan.cos, plan.sin)
        except Exception as error:  # noqa: BLE001 - any compiler/runtime failure: fall back, keep serving
            self.disabled = f"{type(error).__name__}: {error}"
            log.warning("compiled decode disabled, the eager path serves from now on: %s", self.disabled)
            return None
        finally:
            if torch.get_num_threads() != saved:
                torch.set_num_threads(saved)
        kv.write_layers(plan.slot_mapping, new_k, new_v)
        self.calls += 1
        return out
