"""Safetensors weights of an adapter folder, checked from the file header before anything is loaded.

An adapter folder is untrusted input: its tensors become resident next to every other tenant's. So a
reader states which tensors it expects (names and shapes derived from the base model), and this module
refuses, naming the file and tensor, anything else *before* a byte of tensor data is read: unexpected or
missing names, wrong shapes (a file declaring a (100000, 100000) tensor is refused without allocating
it), non-float dtypes. After loading, every tensor must be finite: one NaN or Inf in an adapter would
turn every answer of that adapter into garbage. Errors never quote tensor contents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' names of the dtypes weights may use
K = TypeVar("K")
_KEY_SHOWN = 120  # characters of a tensor name quoted in an error


def read_checked_tensors(path: Path, check: Callable[[str, tuple[int, ...]], None]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, on CPU, after `check(name, shape)` accepted each
    header entry (it raises ValueError naming the problem); dtypes must be float, values finite."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except OSError as error:
        raise ValueError(f"{path} could not be read: {error.strerror}") from None
    except SafetensorError:  # its message may quote the header (`invalid type: string "..."`): not echoed
        raise ValueError(f"{path} is not a valid safetensors file (its header could not be parsed)") from None
    with handle as file:
        names = list(file.keys())
        for name in names:  # the header alone: nothing is allocated until every entry passed
            entry = file.get_slice(name)
            dtype = entry.get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"{path}: tensor {shown(name)} has dtype {dtype}; weights must be one of "
                                 f"{', '.join(sorted(FLOAT_DTYPES))}")
            check(name, tuple(entry.get_shape()))
        tensors = {name: file.get_tensor(name) for name in names}
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{path}: tensor {shown(bad)} holds non-finite values (NaN or Inf)")
    return tensors


def first_non_finite(tensors: Mapping[K, torch.Tensor]) -> K | None:
    """The key of the first tensor holding NaN or Inf, or None when every value is finite.

    One `isfinite` over all tensors of a dtype at once (an r=16 adapter has hundreds of small tensors:
    one check each cost ~13 ms of per-op overhead on the 2-core CPU, against ~1 ms for the copy into one
    flat tensor); tensors are looked at one by one only to name the culprit."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors.values():
        by_dtype.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(flat)).all()) for flat in by_dtype.values()):
        return None
    return next(key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all()))


def shown(name: str) -> str:
    """A tensor name for an error message, bounded (names come from the file)."""
    return repr(name if len(name) <= _KEY_SHOWN else name[:_KEY_SHOWN] + "...")
