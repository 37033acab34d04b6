"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985).

The angle is taken between the flattened tensors; the tensors themselves (not their unit
directions) are combined, so norms interpolate smoothly too. Nearly parallel tensors,
where the angle is numerically meaningless, fall back to linear interpolation.
"""

from __future__ import annotations

import math

from polyft.checks import numbers
from polyft.merge.registry import register

PARALLEL = 1 - 1e-6


def prepare_cosine(chunks, **_) -> dict:
    """Engine hook: the cosine between the two whole tensors, accumulated in float64."""
    dot = na = nb = 0.0
    for (a, b), _base in chunks():
        a, b = a.double().flatten(), b.double().flatten()
        dot, na, nb = dot + float(a @ b), na + float(a @ a), nb + float(b @ b)
    return {"cos": dot / math.sqrt(na * nb) if na and nb else 1.0}


def rules(m) -> None:
    numbers("merge.t", m.t, lambda x: 0 <= x <= 1, "an interpolation factor in [0, 1]")


@register("slerp", params=("t",), min_models=2, max_models=2, prepare=prepare_cosine, rules=rules)
def slerp(tensors, base=None, *, t=0.5, cos=None):
    a, b = tensors
    if cos is None:
        cos = prepare_cosine(lambda: iter([(tensors, None)]))["cos"]
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > PARALLEL:
        return a * (1 - t) + b * t
    omega = math.acos(cos)
    s = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / s) + b * (math.sin(t * omega) / s)
