"""Fully sharded data parallel (`training.distributed.strategy: fsdp`): PyTorch's FSDP2 over the decoder layers.

Each decoder layer (the classes transformers lists in `_no_split_modules`, which is what Accelerate's
`TRANSFORMER_BASED_WRAP` policy wraps) goes through `torch.distributed.fsdp.fully_shard`: every rank
keeps 1/N of the layer's weights (the frozen base, 4-bit or not, and the LoRA matrices alike, as
DTensors) and all-gathers a layer just for its forward and backward. The embeddings, final norm and LM
head stay whole on every rank: our objectives call the decoder and then the LM head on completion
positions only (`loss.py`), which a sharded root module would not allow, and they are frozen, so
they need no gradient sync. Trainable parameters must therefore live inside the decoder layers.

The loop weights each rank's loss by the *global* target count, so the gradient of the run is the
sum over ranks, not the mean FSDP takes by default: the divide factor is 1 and the reduction a plain
sum (gloo, the CPU backend, has no pre-multiplied sum).

Checkpoints and the saved adapter hold full tensors (`full_tensor` gathers them, on every rank
together); loading slices a full tensor back into this rank's shard (`like_parameter`). LoRA state is
megabytes, so gathering it costs nothing that matters, and a checkpoint written by FSDP on N ranks
resumes on M ranks, with DDP, or in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from .loss import unwrap_causal_lm


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules transformers never splits across devices."""
    names = set(getattr(unwrap_causal_lm(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_decoder_layers(model: torch.nn.Module, *, world_size: int, device_type: str) -> int:
    """Shard every decoder layer of `model` over `world_size` ranks, in place; returns how many.

    Raises ValueError before touching the model when something trainable sits outside the layers
    (e.g. `lora.target_modules` naming the LM head): it would be neither sharded nor summed.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"strategy 'fsdp': {type(unwrap_causal_lm(model)).__name__} names no decoder layer "
                         "class (`_no_split_modules`) to shard")
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ValueError(f"strategy 'fsdp' shards the decoder layers only, but {outside[:3]} are trainable "
                         "outside them: use strategy 'ddp' or target modules inside the layers")
    mesh = init_device_mesh(device_type, (world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)
    return len(layers)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must ask, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_parameter(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this rank's shard of it when `param` is sharded, else `full` itself.

    Every rank already holds the full tensor (read from the same file), so each slices its own shard
    without communicating (`src_data_rank=None`).
    """
    if not isinstance(param, DTensor):
        return full
    local = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
