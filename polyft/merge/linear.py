"""Linear soup: a weighted sum of the models, divided by the sum of weights when normalised."""

from __future__ import annotations

from polyft.errors import PolyftError
from polyft.merge.registry import register


def weighted_sum(tensors, weights):
    """sum_i w_i t_i, accumulated in one new tensor (the inputs stay untouched)."""
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


@register("linear", params=("weights", "normalize"))
def linear(tensors, base=None, *, weights, normalize=True):
    out = weighted_sum(tensors, weights)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise PolyftError("merge.weights sum to 0, which merge.normalize=true cannot divide by; "
                              "use weights with a non-zero sum or merge.normalize=false")
        out.div_(total)
    return out
