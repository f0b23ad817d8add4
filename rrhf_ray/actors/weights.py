"""A state dict through Ray's object store, as the samplers' in-memory refresh moves it.

Each tensor travels as its raw bytes in a numpy array (with its dtype name and shape): Ray
stores numpy arrays without pickling them and hands them back to every process on the node as
read-only views of its shared memory, so a replica's fetch copies nothing; a torch tensor would
be pickled into the object and copied out again on every fetch. Bytes rather than a numpy dtype
because bfloat16 has none.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Packed = dict[str, tuple[str, tuple[int, ...], Any]]  # name: (torch dtype name, shape, uint8 array)


def pack_state_dict(state: Mapping[str, torch.Tensor]) -> Packed:
    """`state` as the object store should hold it (one copy of each tensor's bytes, on CPU)."""
    import torch

    return {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                   t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            for name, t in state.items()}


def unpack_state_dict(packed: Packed) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a packed state dict, each tensor a view of the fetched bytes (read-only:
    loading the weights only reads them)."""
    import torch

    for name, (dtype, shape, data) in packed.items():
        with warnings.catch_warnings():  # torch warns that the array is read-only; nothing writes it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(data)
        yield name, flat.view(getattr(torch, dtype)).reshape(shape)


def packed_bytes(packed: Packed) -> int:
    """The bytes of a packed state dict's tensors."""
    return sum(data.nbytes for _, _, data in packed.values())
