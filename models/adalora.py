"""AdaLoRA through PEFT: train with per-layer rank allocation, save as a plain LoRA directory.

PEFT's AdaLoRA (`peft/tuners/adalora/layer.py`, `SVDLinear.forward`) adds to each adapted projection

    y = W x + B (E ⊙ A) x · alpha / (ranknum + 1e-5)

with A (r0, in), E (r0, 1) the "singular values", B (out, r0), r0 = init_r and ranknum = r0, and its
rank allocator zeroes the entries of E it judges unimportant until, summed over all projections, no
more than target_r × (number of projections) remain. A zero E entry removes its row of A and column of
B from the product, so the trained adapter *is* a LoRA whose rank differs per projection.

`to_plain_lora` writes it as one: per projection the kept triplets give A' = (E ⊙ A)[kept] and
B' = B[:, kept]; every projection is zero-padded to the largest kept rank R (zero rows and columns add
nothing, so the result is exact) and lora_alpha is chosen so that alpha' / R = alpha / (ranknum + 1e-5).
Stock PEFT (`PeftModel.from_pretrained`) and the engine (`lora_weights.read_peft_adapter`, plain LoRA
only) load the folder unchanged; the kept ranks travel in the manifest as `rank_pattern`.

Training needs two things PEFT's own forward would otherwise do: the orthogonality penalty on A and B
(`AdaLoraModel.forward` adds it to `outputs.loss` only when the model computes the loss, and our
objectives call the decoder directly, `loss.py`), and `update_and_allocate(step)` after every optimizer
step while the gradients are still there. `AdaLoraAllocation` is that hook for `training.train_adapter`,
including the allocator's state for an exact resume from a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adalora_settings import AdaLoraSettings
from .adapter_dir import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from .lora import LoraSettings, check_target_modules
from .loss import LossOutput

PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules (and its saved tensors)
RANKNUM_EPS = 1e-5  # PEFT's `ranknum + 1e-5` in SVDLinear.forward and get_delta_weight
_STATE_GROUPS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's per-parameter importance EMAs


def apply_adalora(model: Any, lora: LoraSettings, settings: AdaLoraSettings, *, total_steps: int) -> Any:
    """Wrap `model` in a trainable PEFT AdaLoRA whose schedule spans `total_steps` optimizer steps."""
    from peft import AdaLoraConfig, get_peft_model

    check_target_modules(model, lora)
    tinit, tfinal = settings.phase_steps(total_steps)
    config = AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=settings.init_r, target_r=settings.target_r, tinit=tinit, tfinal=tfinal,
        deltaT=settings.deltaT, beta1=settings.beta1, beta2=settings.beta2,
        orth_reg_weight=settings.orth_reg_weight, total_step=total_steps, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(model, config)


def svd_layers(peft_model: Any) -> dict[str, Any]:
    """PEFT module name (without `base_model.model.`) -> its AdaLoRA layer, in model order."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    layers = {name.removeprefix(PEFT_PREFIX): module for name, module in peft_model.named_modules()
              if isinstance(module, AdaLoraLayer)}
    if not layers:
        raise ValueError("the model has no AdaLoRA layers (was it wrapped with apply_adalora?)")
    return layers


def _adapter_name(peft_model: Any) -> str:
    name = getattr(getattr(peft_model, "base_model", None), "trainable_adapter_name", None)
    if name is None:
        raise ValueError("the model has no trainable AdaLoRA adapter (was it wrapped with apply_adalora?)")
    return name


def orthogonal_penalty(peft_model: Any) -> torch.Tensor:
    """PEFT's AdaLoRA regulariser: the mean over A and B matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
    name = _adapter_name(peft_model)
    terms = []
    for layer in svd_layers(peft_model).values():
        a, b = layer.lora_A[name], layer.lora_B[name]  # (r0, in), (out, r0)
        for cov in (a @ a.T, b.T @ b):  # (r0, r0)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                   device=cov.device)))
    return torch.stack(terms).mean()


class OrthRegularized:
    """An objective plus `weight` × the orthogonality penalty. `loss` in the statistics stays the
    objective's own (comparable with LoRA's); the penalty is reported beside it as `orth_reg`."""

    def __init__(self, objective: Callable[[dict[str, torch.Tensor]], LossOutput], peft_model: Any,
                 weight: float) -> None:
        self.objective, self.peft_model, self.weight = objective, peft_model, weight

    def __call__(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        out = self.objective(batch)
        penalty = orthogonal_penalty(self.peft_model)
        sums = {**out.sums, "orth_reg_sum": float(penalty.detach()) * out.n_targets,
                "orth_reg_count": out.n_targets}
        return LossOutput(out.loss + self.weight * penalty, out.n_targets, sums)


class AdaLoraAllocation:
    """The training loop's per-step hook for an AdaLoRA model (`training.RankAllocation`).

    `after_step(step)` runs PEFT's `update_and_allocate` with the number of optimizer steps done (1 after
    the first), so the last step of the run is PEFT's `total_step`: with tfinal 0 that step still makes
    the final allocation down to the budget.
    """

    def __init__(self, peft_model: Any, settings: AdaLoraSettings, total_steps: int) -> None:
        self.peft_model, self.tuner = peft_model, peft_model.base_model
        self.allocator = self.tuner.rankallocator
        self.config = self.tuner.peft_config[_adapter_name(peft_model)]
        self.final_from = settings.final_from(total_steps)
        self.orth_reg_weight = settings.orth_reg_weight

    def objective(self, objective: Callable[[dict[str, torch.Tensor]], LossOutput]) -> OrthRegularized:
        return OrthRegularized(objective, self.peft_model, self.orth_reg_weight)

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """Update importance scores and mask E to this step's budget; needs this step's gradients."""
        self.tuner.update_and_allocate(step)
        budget, _ = self.allocator.budget_schedule(step)
        total_rank = sum(kept_ranks(self.peft_model).values())
        return {"adalora/budget": float(budget), "adalora/total_rank": float(total_rank)}

    def settled(self, step: int) -> bool:
        """Whether the rank pattern is final after `step`: only such weights may be kept as the best."""
        return step >= self.final_from

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The allocator's state (importance EMAs, the current rank pattern) as named CPU tensors."""
        tensors = {f"{group}/{name}": value.detach().cpu().contiguous()
                   for group in _STATE_GROUPS for name, value in getattr(self.allocator, group).items()}
        for name, mask in (self.config.rank_pattern or {}).items():
            tensors[f"rank_pattern/{name}"] = torch.tensor(mask, dtype=torch.bool)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        device = next(self.peft_model.parameters()).device
        for group in _STATE_GROUPS:
            setattr(self.allocator, group, {key.split("/", 1)[1]: value.to(device)
                                            for key, value in tensors.items() if key.startswith(f"{group}/")})
        pattern = {key.split("/", 1)[1]: value.tolist() for key, value in tensors.items()
                   if key.startswith("rank_pattern/")}
        self.config.rank_pattern = pattern or None


def kept_ranks(peft_model: Any) -> dict[str, int]:
    """Module name -> number of non-zero entries of E (the rank that projection really has)."""
    name = _adapter_name(peft_model)
    return {module: int(torch.count_nonzero(layer.lora_E[name]))
            for module, layer in svd_layers(peft_model).items()}


@dataclass(frozen=True)
class PlainLora:
    """A trained AdaLoRA as a standard PEFT LoRA: one rank (`rank`, padded), one scaling."""

    rank: int
    lora_alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    tensors: dict[str, torch.Tensor]  # PEFT's saved names (`base_model.model.<module>.lora_A.weight`…)
    rank_pattern: dict[str, int]  # module -> kept rank (before padding)

    @property
    def kept_params(self) -> int:
        """Parameters of the kept triplets alone, r_m × (in + out) summed (E folded into A)."""
        total = 0
        for module, kept in self.rank_pattern.items():
            a = self.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"]  # (rank, in)
            b = self.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]  # (out, rank)
            total += kept * (a.shape[1] + b.shape[0])
        return total

    def save(self, folder: Path) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` into `folder`."""
        from peft import LoraConfig

        config = LoraConfig(task_type="CAUSAL_LM", r=self.rank, lora_alpha=self.lora_alpha,
                            lora_dropout=self.dropout, target_modules=list(self.target_modules), bias="none",
                            inference_mode=True, base_model_name_or_path=self.base_model_name_or_path)
        raw = config.to_dict()
        raw["target_modules"] = sorted(raw["target_modules"])  # a set in PEFT's dict: not JSON
        text = json.dumps(raw, indent=2, sort_keys=True)
        (Path(folder) / PEFT_CONFIG_FILE).write_text(text, encoding="utf-8")
        save_file(self.tensors, str(Path(folder) / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


@torch.no_grad()
def to_plain_lora(peft_model: Any) -> PlainLora:
    """The trained AdaLoRA model as a plain LoRA with exactly the same forward (see the module docstring)."""
    name = _adapter_name(peft_model)
    layers = svd_layers(peft_model)
    scales = set()
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, layer in layers.items():
        a, e, b = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]  # (r0, in), (r0, 1), (out, r0)
        kept = torch.nonzero(e.view(-1), as_tuple=True)[0]  # (k,)
        parts[module] = ((a * e)[kept].float().cpu(), b[:, kept].float().cpu())  # (k, in), (out, k)
        # computed as PEFT's forward does: the float32 `ranknum` plus the epsilon, then the python scaling
        scales.add(float(layer.scaling[name] / (layer.ranknum[name] + RANKNUM_EPS)))
    if len(scales) != 1:
        raise ValueError(f"AdaLoRA layers with different scalings {sorted(scales)}: no single lora_alpha fits")
    rank = max(1, max(a.shape[0] for a, _ in parts.values()))
    tensors = {}
    for module, (a, b) in parts.items():
        k = a.shape[0]
        padded_a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])  # (rank, in)
        padded_b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)  # (out, rank)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = padded_a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = padded_b.contiguous()
    config = peft_model.peft_config[name]
    return PlainLora(rank=rank, lora_alpha=rank * scales.pop(), dropout=config.lora_dropout,
                     target_modules=tuple(sorted(config.target_modules)),
                     base_model_name_or_path=config.base_model_name_or_path, tensors=tensors,
                     rank_pattern={module: a.shape[0] for module, (a, _) in parts.items()})
