"""DARE (Yu et al., 2024): drop each task-vector entry with probability 1 - density and
rescale the survivors by 1/density, then add (dare_linear) or TIES-merge (dare_ties).

The drop mask of model i for tensor `name` comes from its own generator seeded with
tensor_seed(seed, name, i), so a merge is reproducible for a seed whatever the order or
chunking in which tensors are processed, and each model drops different entries.
"""

from __future__ import annotations

import hashlib

from polyft.merge.registry import register
from polyft.merge.ties import agrees, disjoint_mean, elect_sign


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (merge.seed, tensor name, model index)."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(tv, density: float, seed: int):
    """Keep each entry with probability `density` (uniform draw < density), scaled by 1/density."""
    import torch

    if density >= 1:
        return tv
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(tv.shape, generator=g) < density
    return tv.mul_(keep).div_(density)


def sparse_task_vectors(tensors, base, density, seed, name):
    return [drop_and_rescale(t - base, density, tensor_seed(seed, name, i)) for i, t in enumerate(tensors)]


@register("dare_linear", params=("weights", "scale", "density", "seed", "name"), needs_base=True)
def dare_linear(tensors, base, *, weights, scale, density, seed, name):
    delta = base.new_zeros(base.shape)
    for v, w in zip(sparse_task_vectors(tensors, base, density, seed, name), weights):
        delta.add_(v, alpha=w)
    return delta.mul_(scale).add_(base)


@register("dare_ties", params=("weights", "scale", "density", "seed", "name"), needs_base=True)
def dare_ties(tensors, base, *, weights, scale, density, seed, name):
    sparse = sparse_task_vectors(tensors, base, density, seed, name)
    sign = elect_sign(sparse, weights)
    merged = disjoint_mean(sparse, weights, [agrees(v, sign) for v in sparse])
    return merged.mul_(scale).add_(base)
