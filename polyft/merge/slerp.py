"""Spherical linear interpolation of two models, tensor by tensor (Shoemake, 1985).

The angle is taken between the flattened tensors; the tensors themselves (not their unit
directions) are combined, so norms interpolate smoothly too. Nearly parallel tensors,
where the angle is numerically meaningless, fall back to linear interpolation.
"""

from __future__ import annotations

import math

from polyft.merge.registry import register

PARALLEL = 1 - 1e-6


@register("slerp", params=("t",), min_models=2, max_models=2)
def slerp(tensors, base=None, *, t):
    a, b = tensors
    na, nb = float(a.norm()), float(b.norm())
    cos = float((a.flatten().double() @ b.flatten().double()) / (na * nb)) if na and nb else 1.0
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > PARALLEL:
        return a * (1 - t) + b * t
    omega = math.acos(cos)
    s = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / s) + b * (math.sin(t * omega) / s)
