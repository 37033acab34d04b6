"""Task arithmetic (Ilharco et al., 2023): theta = base + lambda * sum_i w_i (theta_i - base)."""

from __future__ import annotations

from polyft.merge.registry import register


@register("task_arithmetic", params=("weights", "scale"), needs_base=True)
def task_arithmetic(tensors, base, *, weights, scale=1.0):
    delta = base.new_zeros(base.shape)
    for t, w in zip(tensors, weights):
        delta.add_(t - base, alpha=w)
    return delta.mul_(scale).add_(base)
