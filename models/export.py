"""Export an adapter as a stand-alone model folder: base + LoRA merged, loadable by stock `transformers`.

Someone without lorafleet (another serving stack, a notebook, a colleague) gets a plain
`AutoModelForCausalLM.from_pretrained(folder)` model whose logits are the base+adapter logits. The merge is
PEFT's own `merge_and_unload()` (PEFT is the oracle for LoRA math), done in fp32 so nothing is lost
to rounding and every stock loader reads the result.

What travels with the weights: the tokenizer (with its chat template), the adapter's `lorafleet.json`
(lineage: base model and revision, data fingerprint, metrics) and, for Turbo adapters, the speculative
heads' two files, which stock transformers ignores and a Medusa-style runtime can use.

The folder appears all at once: everything is written into a hidden sibling folder that is renamed into
place at the end, so a failed export leaves neither a half-written OUT_DIR nor the staging folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter_dir import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TURBO_CONFIG_FILE,
    TURBO_WEIGHTS_FILE,
    InvalidAdapterDir,
    adapter_file,
    has_lora,
    validate_adapter_dir,
)
from .base import load_base_model
from .lora import load_adapter
from .turbo_heads import has_heads, load_heads

log = logging.getLogger(__name__)

# The merged model's logits must equal PEFT's unmerged base+adapter logits on a probe sequence, to this
# fraction of the largest |logit| (at least 1), before anything is saved. fp32 rounding of the merge
# stays far below it (SmolLM2-135M, r=16 on every linear layer, B ~ N(0, 0.2): 1.5e-4 on logits of 29,
# i.e. 5e-6 of them); a merge that really changes the model (a tied layer) is far above it.
MERGE_RTOL = 1e-4
PROBE_IDS = (1, 40, 41, 42, 43, 44, 45, 2)  # a short sequence inside every vocabulary we load (≥ 46 tokens)


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote, for the CLI's summary line."""

    out_dir: str
    adapter_dir: str
    name: str
    method: str
    base_model: str
    base_revision: str
    revision_matches: bool  # the base resolved now is the revision the adapter was trained on
    merged_lora: bool  # False for a heads-only Turbo adapter: the base is exported as it is
    heads: bool  # turbo_config.json + turbo_heads.safetensors copied
    parameters: int
    max_merge_diff: float  # |merged - unmerged| on the probe sequence (0.0 when nothing was merged)


def export_merged(adapter_dir: Path, out_dir: Path, *, model_cache_dir: Path, device: str = "cpu") -> ExportReport:
    """Write base + adapter merged into `out_dir` (safetensors, config, tokenizer, manifest, Turbo heads).

    `out_dir` must not exist or be empty: FileExistsError otherwise, and it is left untouched. An invalid
    adapter folder is InvalidAdapterDir (a ValueError) naming the folder and file. A QLoRA adapter is
    merged into the full-precision base (what it was trained on, dequantized), so its export's logits
    are base+adapter in fp32, not the 4-bit model's."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    manifest = validate_adapter_dir(adapter_dir)
    _check_target(out_dir)
    loaded = load_base_model(manifest.base_model.id, model_cache_dir, dtype="float32", device=device)
    revision_matches = loaded.resolved.revision == manifest.base_model.revision
    if not revision_matches:
        log.warning("%s was trained on revision %s of %s; exporting it merged into revision %s", adapter_dir,
                    manifest.base_model.revision, manifest.base_model.id, loaded.resolved.revision)
    heads = has_heads(adapter_dir)
    if heads:  # refuse heads made for another base before writing anything (sizes checked, values finite)
        config = loaded.model.config
        load_heads(adapter_dir, hidden_size=config.hidden_size, vocab_size=config.vocab_size)

    model, max_diff, lora = loaded.model, 0.0, has_lora(adapter_dir)
    if lora:
        model, max_diff = _merge(model, adapter_dir)
    with _staging(out_dir) as staging:
        model.save_pretrained(str(staging))  # transformers 5 writes safetensors only
        loaded.tokenizer.save_pretrained(str(staging))
        copied = [MANIFEST_FILE] + ([TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE] if heads else [])
        for filename in copied:  # through adapter_file: a link out of the adapter folder is refused
            shutil.copyfile(adapter_file(adapter_dir, filename), staging / filename)
    return ExportReport(
        out_dir=str(out_dir), adapter_dir=str(adapter_dir), name=manifest.name, method=manifest.method,
        base_model=manifest.base_model.id, base_revision=loaded.resolved.revision,
        revision_matches=revision_matches, merged_lora=lora, heads=heads,
        parameters=sum(p.numel() for p in model.parameters()), max_merge_diff=max_diff)


def _merge(base_model: Any, adapter_dir: Path) -> tuple[Any, float]:
    """PEFT's merge, checked: the merged model's probe logits must equal the unmerged ones.

    A merge can silently change a model, e.g. LoRA on an `lm_head` tied to the input embeddings moves
    the embeddings too; the check turns that into an error instead of a wrong export."""
    import torch

    try:
        peft_model = load_adapter(base_model, adapter_dir).eval()
    except InvalidAdapterDir:  # ours already names the folder and file
        raise
    except Exception as error:  # PEFT, safetensors, torch: a corrupt or mis-shaped file
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise InvalidAdapterDir(f"{adapter_dir}: PEFT could not load the LoRA ({PEFT_CONFIG_FILE}, "
                                f"{PEFT_WEIGHTS_FILE}): {type(error).__name__}: {first_line}") from error
    ids = torch.tensor([PROBE_IDS], device=next(peft_model.parameters()).device)  # (1, T)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits  # (1, T, V)
        merged = peft_model.merge_and_unload().eval()
        actual = merged(input_ids=ids).logits  # (1, T, V)
    max_diff = (actual - expected).abs().max().item()
    tolerance = MERGE_RTOL * max(1.0, expected.abs().max().item())
    if not max_diff <= tolerance:  # `not <=` also catches NaN
        raise ValueError(f"{adapter_dir}: the merged model's logits differ from base+adapter by {max_diff:.3g} "
                         f"(more than {tolerance:.3g}); is a LoRA-adapted layer tied to another?")
    return merged, max_diff


def _check_target(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} already exists and is not empty: choose a new or empty folder")
    elif out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} already exists and is not a folder")


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder renamed onto `out_dir` when the block finishes, removed when it fails.

    `os.replace` onto an empty folder succeeds and onto a non-empty one fails, so a folder filled by
    someone else after `_check_target` is still never overwritten."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the folder becomes OUT_DIR, so it gets the umask's mode, not 0700.
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.export"
    staging.mkdir()
    try:
        yield staging
        try:
            os.replace(staging, out_dir)
        except OSError as error:  # filled (or made a file) meanwhile: ENOTEMPTY, ENOTDIR
            raise FileExistsError(f"{out_dir} could not be written: {error.strerror}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
