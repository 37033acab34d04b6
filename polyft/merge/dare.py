"""DARE (Yu et al., 2024): drop each task-vector entry with probability 1 - density and
rescale the survivors by 1/density, then add (dare_linear) or TIES-merge (dare_ties).

dare_ties elects signs and keeps agreeing entries as ties does (merge.sign_tie), then sums
them without dividing by the kept weights, as mergekit's dare_ties does by default
(merge.normalize=false in conf/merge/dare_ties.yaml; true divides as TIES' disjoint mean).
The rescale is the DARE paper's 1/density; mergekit 0.1.5 instead rescales each tensor so
its L1 norm is unchanged, which equals 1/density only in expectation.

Randomness is fixed per block of BLOCK_ROWS rows: the keep mask of model i for rows
[b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS) of tensor `name` is
torch.rand(BLOCK_ROWS, row_size, generator=manual_seed(tensor_seed(seed, name, i, b))) < density
(the tensor seen as rows x the rest; a 1-D tensor has rows of one entry). So a merge is
reproducible for a seed whatever order or block size the engine uses, and models differ.
"""

from __future__ import annotations

import hashlib

from polyft.merge import ties
from polyft.merge.registry import register
from polyft.merge.ties import agrees, consensus, elect_sign, majority_of

BLOCK_ROWS = 64


def tensor_seed(seed: int, name: str, index: int, block: int) -> int:
    """A 63-bit seed from (merge.seed, tensor name, model index, row block)."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape, row0: int, density: float, seed: int, name: str, index: int):
    """The keep mask of rows [row0, row0 + shape[0]) of a tensor (shape: rows x the rest)."""
    import torch

    rows = shape[0] if len(shape) else 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    first, last = row0 // BLOCK_ROWS, (row0 + rows - 1) // BLOCK_ROWS
    g = torch.Generator()
    blocks = []
    for b in range(first, last + 1):
        g.manual_seed(tensor_seed(seed, name, index, b))
        blocks.append(torch.rand(BLOCK_ROWS, cols, generator=g))
    draws = torch.cat(blocks)
    skip = row0 - first * BLOCK_ROWS
    return (draws[skip:skip + rows] < density).reshape(shape)


def sparse_task_vectors(tensors, base, density, seed, name, row0):
    out = []
    for i, t in enumerate(tensors):
        tv = t - base
        if density < 1:
            tv.mul_(keep_mask(tv.shape, row0, density, seed, name, i)).div_(density)
        out.append(tv)
    return out


@register("dare_linear", params=("weights", "scale", "density", "seed", "name", "row0"), needs_base=True,
          rules=ties.density_rule)
def dare_linear(tensors, base, *, weights, density, name, scale=1.0, seed=0, row0=0):
    delta = base.new_zeros(base.shape)
    for v, w in zip(sparse_task_vectors(tensors, base, density, seed, name, row0), weights):
        delta.add_(v, alpha=w)
    return delta.mul_(scale).add_(base)


def prepare_majority(chunks, *, weights, density, name, seed=0, sign_tie="positive", **_) -> dict:
    """Engine hook: for merge.sign_tie=majority, the whole tensor's majority sign."""
    if sign_tie != "majority":
        return {}

    def sparse_chunks():
        row0 = 0
        for tensors, base in chunks():
            yield sparse_task_vectors(tensors, base, density, seed, name, row0)
            row0 += base.shape[0] if base.dim() else 1

    return majority_of(sparse_chunks(), weights)


@register("dare_ties", params=("weights", "scale", "density", "seed", "name", "row0", "sign_tie", "normalize"),
          needs_base=True, prepare=prepare_majority, rules=ties.rules)
def dare_ties(tensors, base, *, weights, density, name, scale=1.0, seed=0, row0=0, sign_tie="positive",
              normalize=False, majority=None):
    sparse = sparse_task_vectors(tensors, base, density, seed, name, row0)
    sign = elect_sign(sparse, weights, sign_tie, majority)
    keep = [agrees(v, w, sign) for v, w in zip(sparse, weights)]
    return consensus(sparse, weights, keep, normalize).mul_(scale).add_(base)
