"""TIES with a slack variable on sign election (TIES-SV, after Tao et al., 2024, arXiv 2407.03994).

Merging a continually pre-trained model (tau_CT) with an English SFT model (tau_SFT), plain
TIES discards SFT entries whose sign loses the election. TIES-SV keeps such an entry when
it is in the SFT vector's top-k and |tau_SFT| >= (1 - slack) * |tau_CT|: it then joins the
disjoint mean like an agreeing entry. The paper does not pin the formula down; this is the
reading polyft offers (PAPERS.md section 4).

Conventions: merge.models[0] is the SFT model, every later model a CT model; |tau_CT| is
the largest trimmed CT magnitude at that entry. slack=0 is plain TIES for two equally
weighted models (a losing SFT entry is then always smaller than the CT one); slack=1 keeps
every top-k SFT entry. The diagnostic the paper studies, the fraction of the SFT vector's
top-k (non-zero) entries that survive into the merge, goes to the manifest and run.json.
"""

from __future__ import annotations

from polyft.merge.registry import register
from polyft.merge.ties import agrees, disjoint_mean, elect_sign, prepare_thresholds, trimmed_task_vectors

SFT = 0  # index of the SFT model in merge.models


@register("ties_sv", params=("weights", "scale", "density", "slack", "stats"), needs_base=True,
          min_models=2, prepare=prepare_thresholds, summary=lambda s: {
              "sft_topk_kept_fraction": s["sft_kept"] / s["sft_topk"] if s.get("sft_topk") else None,
              "sft_topk_entries": s.get("sft_topk", 0), "sft_rescued_by_slack": s.get("sft_rescued", 0)})
def ties_sv(tensors, base, *, weights, density, stats, scale=1.0, slack=0.1, thresholds=None):
    trimmed, masks = trimmed_task_vectors(tensors, base, density, thresholds)
    sign = elect_sign(trimmed, weights)
    keep = [agrees(v, sign) for v in trimmed]
    ct = trimmed[:SFT] + trimmed[SFT + 1:]
    ct_max = ct[0].abs()
    for v in ct[1:]:
        ct_max = ct_max.maximum(v.abs())
    sft = trimmed[SFT]
    in_topk = masks[SFT] & (sft != 0)
    rescued = in_topk & ~keep[SFT] & (sft.abs() >= (1.0 - slack) * ct_max)
    keep[SFT] = keep[SFT] | rescued
    stats["sft_topk"] = stats.get("sft_topk", 0) + int(in_topk.sum())
    stats["sft_kept"] = stats.get("sft_kept", 0) + int((keep[SFT] & in_topk).sum())
    stats["sft_rescued"] = stats.get("sft_rescued", 0) + int(rescued.sum())
    merged = disjoint_mean(trimmed, weights, keep)
    return merged.mul_(scale).add_(base)
