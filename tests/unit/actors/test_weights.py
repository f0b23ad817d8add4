"""A state dict packed for the object store (`rrhf_ray.actors.weights`) comes back bit for bit,
whatever its dtypes and layouts, and through Ray as views of the store's memory (no copy)."""

from __future__ import annotations

import torch

from rrhf_ray.actors.weights import pack_state_dict, packed_bytes, unpack_state_dict


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(7, 4, generator=gen).to(torch.bfloat16),
            "proj.weight": torch.randn(4, 6, generator=gen).to(torch.float16).t(),  # not contiguous
            "norm.weight": torch.randn(4, generator=gen),
            "scale": torch.tensor(0.5, dtype=torch.bfloat16),  # 0-dim
            "index": torch.arange(3)}


def test_a_packed_state_dict_unpacks_to_the_same_tensors() -> None:
    original = state()
    packed = pack_state_dict(original)
    assert packed_bytes(packed) == 7 * 4 * 2 + 24 * 2 + 4 * 4 + 2 + 3 * 8
    back = dict(unpack_state_dict(packed))
    assert list(back) == list(original)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_through_ray_the_tensors_are_views_of_the_object_store(ray_cluster) -> None:
    packed = ray_cluster.get(ray_cluster.put(pack_state_dict(state())))
    assert all(not data.flags.writeable for _, _, data in packed.values())  # the store's memory, not a copy
    back = dict(unpack_state_dict(packed))
    assert all(torch.equal(back[name], t) for name, t in state().items())
