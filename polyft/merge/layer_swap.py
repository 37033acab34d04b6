"""Layer swapping (Bandarkar et al., ICLR 2025, arXiv 2410.01335).

Two experts of one base: the `middle` model (the math expert) keeps its middle layers,
the `outer` model (the language expert) gives its bottom and top layers; transition zones
next to them blend the two. For L layers and layer index l:

    l < b                    outer
    b <= l < b + t_b         blend
    b + t_b <= l < L-u-t_u   middle
    L-u-t_u <= l < L-u       blend
    l >= L-u                 outer

A layer's norms are part of it. Tensors outside the layers (embeddings, final norm,
lm_head) come from `non_layer`: outer, middle or their average. Blend weights are
(w_middle, w_outer), normalised to sum to 1.
"""

from __future__ import annotations

from polyft.checks import choice
from polyft.errors import ConfigError
from polyft.merge.registry import register

NON_LAYER = ("outer", "middle", "average")


def rules(m) -> None:
    choice("merge.non_layer", m.non_layer, NON_LAYER)
    for key in ("bottom", "top", "transition_bottom", "transition_top"):
        if m[key] < 0:
            raise ConfigError(f"merge.{key}={m[key]} is not allowed; a number of layers is >= 0")
    if len(m.blend) != 2 or min(m.blend) < 0 or sum(m.blend) <= 0:
        raise ConfigError(f"merge.blend={list(m.blend)} is not allowed; give [w_middle, w_outer], "
                          "two weights >= 0 with a positive sum")


def zone(layer: int, n_layers: int, bottom: int, top: int, transition_bottom: int,
         transition_top: int) -> str:
    if layer < bottom or layer >= n_layers - top:
        return "outer"
    if layer < bottom + transition_bottom or layer >= n_layers - top - transition_top:
        return "blend"
    return "middle"


def mix(layer: int | None, n_layers: int, *, bottom: int = 0, top: int = 0, transition_bottom: int = 0,
        transition_top: int = 0, blend=(0.5, 0.5), non_layer: str = "average") -> tuple[float, float]:
    """(weight of middle, weight of outer) for a tensor of `layer` (None: not in a layer)."""
    w_middle, w_outer = (float(w) for w in blend)
    blended = (w_middle / (w_middle + w_outer), w_outer / (w_middle + w_outer))
    if layer is None:
        return {"outer": (0.0, 1.0), "middle": (1.0, 0.0), "average": (0.5, 0.5)}[non_layer]
    where = zone(layer, n_layers, bottom, top, transition_bottom, transition_top)
    return {"outer": (0.0, 1.0), "middle": (1.0, 0.0), "blend": blended}[where]


@register("layer_swap", params=("mix",), min_models=2, max_models=2, route=mix, rules=rules)
def layer_swap(tensors, base=None, *, mix):
    middle, outer = tensors
    return middle * mix[0] + outer * mix[1]
