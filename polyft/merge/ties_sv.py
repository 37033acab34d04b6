"""TIES with a slack variable on sign election (TIES-SV, after Tao et al., 2024, arXiv 2407.03994).

Merging a continually pre-trained model (tau_CT) with an English SFT model (tau_SFT), plain
TIES discards SFT entries whose sign loses the election. TIES-SV keeps such an entry when
it is in the SFT vector's top-k and |tau_SFT| >= (1 - slack) * |tau_CT|: it then joins the
disjoint mean like an agreeing entry. The paper does not pin the formula down; this is the
reading polyft offers (PAPERS.md section 4).

Conventions: merge.models[0] is the SFT model, every later model a CT model; |tau_CT| is
the largest trimmed CT magnitude at that entry. Both methods run one function
(ties.ties_merge): slack=0 rescues nothing, so it is plain TIES exactly, exact ties
included; slack=1 keeps every top-k SFT entry. The diagnostic the paper studies, the
fraction of the SFT vector's top-k (non-zero) entries that survive into the merge, goes to
the manifest and run.json.
"""

from __future__ import annotations

from polyft.errors import ConfigError
from polyft.merge import ties
from polyft.merge.registry import register
from polyft.merge.ties import prepare_ties, ties_merge


def diagnostics(s: dict) -> dict:
    return {"sft_topk_kept_fraction": s["sft_kept"] / s["sft_topk"] if s.get("sft_topk") else None,
            "sft_topk_entries": s.get("sft_topk", 0), "sft_rescued_by_slack": s.get("sft_rescued", 0)}


def rules(m) -> None:
    ties.rules(m)
    if isinstance(m.slack, bool) or not isinstance(m.slack, (int, float)) or not 0 <= m.slack <= 1:
        raise ConfigError(f"merge.slack={m.slack} is not allowed; use a number in [0, 1]")


@register("ties_sv", params=("weights", "scale", "density", "slack", "sign_tie", "normalize", "stats"),
          needs_base=True, min_models=2, prepare=prepare_ties, summary=diagnostics, rules=rules)
def ties_sv(tensors, base, *, weights, density, stats, scale=1.0, slack=0.1, sign_tie="positive",
            normalize=True, thresholds=None, majority=None):
    return ties_merge(tensors, base, weights=weights, density=density, scale=scale, sign_tie=sign_tie,
                      normalize=normalize, thresholds=thresholds, majority=majority, slack=slack, stats=stats)
