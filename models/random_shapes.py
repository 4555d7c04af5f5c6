"""Random-initialised base models of real, named shapes: `random:llama-1b` and friends.

GPU speed depends on the shapes (hidden size, heads, layers, vocabulary), not on the trained values,
and the GPU machines here cannot download weights. So a benchmark names a real architecture and gets its
exact shape with seeded random weights (bf16 on disk), built once into the model cache like the tiny
model, with the tiny model's byte tokenizer (ids far below every vocabulary here). Outputs are noise;
speed, memory and the engine's equality tests are what these models are for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .cache import atomic_directory, file_lock, sha256_file
from .tiny import build_byte_tokenizer

RANDOM_PREFIX = "random:"
_REVISION_FILE = "lorafleet_revision.json"
_NAME = re.compile(r"^random:([a-z0-9.\-]+)$")

_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True}

# Shapes as their published config.json files give them (Llama 3.2 1B and 3B, SmolLM2 135M), plus a
# tiny one that builds in a second, for tests of this module.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, **_LLAMA32},
    "llama-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                 "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, **_LLAMA32},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}


def is_random_name(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def random_model_dir(name: str, cache_dir: Path, *, seed: int = 0) -> Path:
    """Build (once) and return the cached folder of `random:SHAPE`; unknown shapes name the known ones."""
    match = _NAME.match(name)
    if match is None or match.group(1) not in SHAPES:
        raise ValueError(f"unknown random base {name!r}: choose from "
                         f"{', '.join(RANDOM_PREFIX + shape for shape in SHAPES)}")
    shape = match.group(1)
    target = Path(cache_dir) / f"random-{shape}-seed{seed}"
    if (target / _REVISION_FILE).exists():
        return target
    with file_lock(Path(cache_dir) / f".random-{shape}.lock"):
        if not (target / _REVISION_FILE).exists():
            _build(target, shape, seed)
    return target


def random_revision(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / _REVISION_FILE).read_text())["revision"]


def _build(target: Path, shape: str, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        build_byte_tokenizer().save_pretrained(staging)
        files = sorted(staging.glob("*.safetensors"))
        revision = {"shape": shape, "seed": seed, "revision": sha256_file(files[0])[:16]}
        (staging / _REVISION_FILE).write_text(json.dumps(revision, indent=2))
