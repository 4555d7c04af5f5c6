"""The engine's budgets: the one place their defaults live.

The service nests this model (`ServiceSettings.engine`) instead of re-declaring its fields, and maps its
documented environment variables onto them (`LORAFLEET_SERVE_KV_CACHE_MB` -> `kv_cache_mb`,
`LORAFLEET_SERVE_MAX_QUEUE` -> `max_waiting`, see `serving/settings.py`). Defaults are what the service
runs with, sized for the embedded SmolLM2 on a laptop CPU. Pydantic (not torch) so that the settings, the
CLI and the launcher can import it without loading the engine.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# How the base model's projection weights are held (serving/engine/quantized.py): 'dense' in the model's
# dtype, or weight-only int8 / int4 (CPU only; bf16 inside their matmuls, the model's dtype around them).
WeightFormat = Literal["dense", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)

# Whether Turbo heads draft (serving/engine/speculation_policy.py): 'adaptive' decides per step by measured
# gain, 'on' always drafts, 'off' never does.
SpeculationMode = Literal["adaptive", "on", "off"]

# The queue bound of every generator (the PEFT runner takes it too): beyond it, HTTP 429.
DEFAULT_MAX_WAITING = 256


class EngineConfig(BaseModel):
    """Budgets of one engine; every field is validated on creation and errors name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    kv_cache_mb: float = Field(512, gt=0, description="KV-cache memory budget; the scheduler preempts (and "
                               "recomputes later) when it runs out")
    max_num_seqs: int = Field(32, ge=1, le=1024, description="sequences decoding together per step")
    max_tokens_per_step: int = Field(512, ge=1, description="packed tokens per forward (prefill chunks + "
                                     "decodes); below max_num_seqs the engine uses max_num_seqs, since every "
                                     "running sequence needs a token per step")
    max_waiting: int = Field(DEFAULT_MAX_WAITING, ge=1, description="waiting requests beyond this are refused "
                             "(QueueFull, HTTP 429)")
    speculation: SpeculationMode = Field("adaptive", description="Turbo heads: 'adaptive' drafts in a step only "
                                         "while the measured tokens per second of drafting steps (tau per "
                                         "adapter over the step's cost at this batch size) beat plain steps; "
                                         "'on' always drafts, 'off' never")
    adapter_slots: int = Field(16, ge=1, description="adapters resident at once (LRU beyond)")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank an adapter may have (vLLM's default "
                               "too); every slot is sized for it, so memory and LoRA work grow with it")
    weights: WeightFormat = Field("dense", description="base weights: 'dense' (the model's dtype), or "
                                  "weight-only 'int8' / 'int4' (groups of 32; bf16 inside their matmuls), CPU "
                                  "only: fewer bytes per decoded token, measured quality in docs/performance.md")
    thread_tuning: bool = Field(True, description="CPU: choose torch's thread count per kind of step by "
                                "measured step time (fewer threads win while another process takes a core; "
                                "models/thread_tuning.py)")
    compile_decode: bool = Field(False, description="run pure decode steps of the base model (rows without "
                                 "LoRA) as one torch.compile'd graph: fewer ops per token (measured in "
                                 "docs/performance.md); needs a C++ compiler at run time and compiles at "
                                 "startup (~1.5 min per variant on 2 cores, ~15 s from Inductor's disk "
                                 "cache; every variant before serving); graphs exist for all threads and "
                                 "one fewer, the counts thread tuning uses beside one busy neighbour")
    prefix_caching: bool = Field(True, description="reuse the K/V of prompt prefixes already computed with "
                                 "the same adapter")
