"""oneDNN's prepacked linear as custom ops, so a compiled graph can call it (module `compiled_decode`).

Inductor lowers `mkldnn._linear_pointwise` only for weights it prepacked itself (frozen constants); a
weight prepacked at load and passed in as a graph input fails its lowering. Wrapped as custom ops
with a shape-only fake implementation, the compiled graph calls them as opaque kernels and fuses
everything around them. Eager forwards keep calling the oneDNN ops directly (no wrapper to pay).
No `from __future__ import annotations` here: `custom_op` reads the type hints as types.
"""

import torch
from torch import Tensor


@torch.library.custom_op("lorafleet::prepacked_linear", mutates_args=())
def prepacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x (M, in) @ W^T (+ bias) for a weight from `mkldnn._reorder_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@prepacked_linear.register_fake
def _prepacked_linear_shape(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("lorafleet::prepacked_linear_add", mutates_args=())
def prepacked_linear_add(x: Tensor, residual: Tensor, weight: Tensor) -> Tensor:
    """residual + x @ W^T in one oneDNN call (a new tensor; the residual is not modified)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")


@prepacked_linear_add.register_fake
def _prepacked_linear_add_shape(x: Tensor, residual: Tensor, weight: Tensor) -> Tensor:
    return residual.new_empty(residual.shape)
