"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

Each task vector tau_i = theta_i - base keeps its top-k entries by magnitude, k =
int(density * numel) (at least 1, as mergekit counts it). Entries tied with the k-th largest
magnitude are all kept, so trimming is a threshold and works chunk by chunk once the
threshold is known; mergekit keeps exactly k and breaks such ties by its sort order, so the
two differ only on entries tied at the threshold (common in bf16, rare in fp32).

The sign of every entry is elected from sum_i w_i trim(tau_i). A vote that sums to exactly 0
(opposite task vectors, frequent in bf16) elects + by default, as mergekit does
(merge.sign_tie=positive); merge.sign_tie=majority gives it the sign most entries of the
tensor elected, as the TIES authors' code does over its whole flattened model (polyft merges
tensor by tensor, so its "whole vector" is the tensor). A model's entry joins when w_i
trim(tau_i) has the elected sign; the merged vector is sum_i w_i v_i [kept] divided by
sum_i w_i [kept] (merge.normalize=true, the paper's disjoint mean with equal weights) or not
divided (normalize=false), and theta = base + scale * merged.
"""

from __future__ import annotations

from polyft.checks import choice, numbers
from polyft.merge.linear import weighted_sum
from polyft.merge.registry import register


def _bits(v):
    """The int32 bit patterns of |v| (fp32), which sort like the magnitudes."""
    import torch

    return v.float().abs().view(torch.int32).flatten()


def magnitude_thresholds(chunks, ks: list[int]) -> list[float]:
    """The k-th largest magnitude of each of several vectors streamed as chunks.

    `chunks()` yields, on every call, the same sequence of lists [v_0, v_1, ...] of chunks.
    Radix selection: one pass counts the high 16 bits of the magnitudes, a second pass the
    low 16 bits inside the bucket holding the k-th; exact, memory of one chunk, and several
    times faster than sorting, topk or kthvalue on tensors of 10^7-10^8 entries."""
    import torch

    high = [torch.zeros(1 << 15, dtype=torch.int64) for _ in ks]
    for vs in chunks():
        for h, v in zip(high, vs):
            h += torch.bincount(_bits(v) >> 16, minlength=1 << 15)
    picks = []  # (bucket of the high bits, rank of the k-th inside it)
    for h, k in zip(high, ks):
        at_or_above = h.flip(0).cumsum(0)
        j = int(torch.searchsorted(at_or_above, k))
        picks.append((h.numel() - 1 - j, k - (int(at_or_above[j - 1]) if j else 0)))
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in ks]
    for vs in chunks():
        for lo, v, (bucket, _) in zip(low, vs, picks):
            b = _bits(v)
            lo += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    out = []
    for lo, (bucket, rank) in zip(low, picks):
        j = int(torch.searchsorted(lo.flip(0).cumsum(0), rank))
        bits = torch.tensor([(bucket << 16) | (lo.numel() - 1 - j)], dtype=torch.int32)
        out.append(float(bits.view(torch.float32)))
    return out


def keep_count(density: float, numel: int) -> int:
    return max(1, int(density * numel))


def topk_mask(tv, density: float, threshold: float | None = None):
    """Entries of `tv` whose magnitude is among the top `density` share (ties included)."""
    import torch

    if threshold is None:
        k = keep_count(density, tv.numel())
        if k >= tv.numel():
            return torch.ones_like(tv, dtype=torch.bool)
        threshold = magnitude_thresholds(lambda: iter([[tv]]), [k])[0]
    return tv.abs() >= threshold


def trimmed_task_vectors(tensors, base, density, thresholds=None):
    """(trimmed task vectors, their top-k masks); every tensor here is freshly allocated."""
    trimmed, masks = [], []
    for i, t in enumerate(tensors):
        tv = t - base
        mask = topk_mask(tv, density, None if thresholds is None else thresholds[i])
        trimmed.append(tv.mul_(mask))
        masks.append(mask)
    return trimmed, masks


# ---------------------------------------------------------------- sign consensus

SIGN_TIES = ("positive", "majority")


def density_rule(m) -> None:
    numbers("merge.density", m.density, lambda x: 0 < x <= 1, "a density in (0, 1]")


def rules(m) -> None:
    density_rule(m)
    choice("merge.sign_tie", m.sign_tie, SIGN_TIES)


def vote(vectors, weights):
    """The sign of sum_i w_i v_i, entry by entry (0 where the vote is an exact tie)."""
    return weighted_sum(vectors, weights).sign_()


def tensor_majority(votes_sum: float) -> float:
    """The sign most entries elected: the TIES authors' answer to a tied vote."""
    return float((votes_sum > 0) - (votes_sum < 0))


def elect_sign(vectors, weights, sign_tie: str = "positive", majority: float | None = None):
    """The elected sign of every entry; an exactly tied vote gets + (positive) or `majority`
    (computed from these vectors when the caller has no whole-tensor value)."""
    sign = vote(vectors, weights)
    if sign_tie == "majority":
        fill = tensor_majority(float(sign.sum())) if majority is None else majority
    else:
        fill = 1.0
    return sign.masked_fill_(sign == 0, fill)


def agrees(v, w: float, sign):
    """Entries where w * v is non-zero and has the elected sign."""
    if w > 0:
        return v * sign > 0
    if w < 0:
        return v * sign < 0
    return v.new_zeros(v.shape, dtype=bool)


def consensus(vectors, weights, keep, normalize: bool = True):
    """sum_i w_i v_i [keep_i], divided by sum_i w_i [keep_i] when normalised (0 where no model is kept)."""
    import torch

    num = torch.zeros_like(vectors[0])
    den = torch.zeros_like(vectors[0])
    for v, w, k in zip(vectors, weights, keep):
        kf = k.to(num.dtype)
        num.addcmul_(v, kf, value=w)
        den.add_(kf, alpha=w)
    return num.div_(den.masked_fill_(den == 0, 1.0)) if normalize else num


def majority_of(vector_chunks, weights) -> dict:
    """Engine hook helper: the whole tensor's majority sign from its chunks' vectors."""
    total = 0.0
    for vs in vector_chunks:
        total += float(vote(vs, weights).sum())
    return {"majority": tensor_majority(total)}


# ---------------------------------------------------------------- TIES and TIES-SV

def prepare_ties(chunks, *, numel: int, density: float, weights, sign_tie: str = "positive", **_) -> dict:
    """Engine hook: each task vector's trimming threshold over the whole tensor, and, for
    merge.sign_tie=majority, the tensor's majority sign."""
    n_models = len(next(iter(chunks()))[0])
    k = keep_count(density, numel)
    if k >= numel:
        out = {"thresholds": [0.0] * n_models}  # keep everything
    else:
        def task_chunks():
            return ([t - base for t in tensors] for tensors, base in chunks())

        out = {"thresholds": magnitude_thresholds(task_chunks, [k] * n_models)}
    if sign_tie == "majority":
        out.update(majority_of((trimmed_task_vectors(tensors, base, density, out["thresholds"])[0]
                                for tensors, base in chunks()), weights))
    return out


def ties_merge(tensors, base, *, weights, density, scale, sign_tie, normalize, thresholds, majority,
               slack: float = 0.0, stats: dict | None = None):
    """TIES; with slack > 0, TIES-SV's rescue of the SFT model's (models[0]) losing top-k entries."""
    trimmed, masks = trimmed_task_vectors(tensors, base, density, thresholds)
    sign = elect_sign(trimmed, weights, sign_tie, majority)
    keep = [agrees(v, w, sign) for v, w in zip(trimmed, weights)]
    if stats is not None:
        sft = trimmed[0]
        in_topk = masks[0] & (sft != 0)
        rescued = in_topk & ~keep[0]
        if slack > 0:
            ct_max = trimmed[1].abs()
            for v in trimmed[2:]:
                ct_max = ct_max.maximum(v.abs())
            rescued &= sft.abs() >= (1.0 - slack) * ct_max
        else:  # slack 0 is plain TIES: nothing is rescued, not even at an exact tie
            rescued.zero_()
        keep[0] = keep[0] | rescued
        stats["sft_topk"] = stats.get("sft_topk", 0) + int(in_topk.sum())
        stats["sft_kept"] = stats.get("sft_kept", 0) + int((keep[0] & in_topk).sum())
        stats["sft_rescued"] = stats.get("sft_rescued", 0) + int(rescued.sum())
    return consensus(trimmed, weights, keep, normalize).mul_(scale).add_(base)


@register("ties", params=("weights", "scale", "density", "sign_tie", "normalize"), needs_base=True,
          prepare=prepare_ties, rules=rules)
def ties(tensors, base, *, weights, density, scale=1.0, sign_tie="positive", normalize=True,
         thresholds=None, majority=None):
    return ties_merge(tensors, base, weights=weights, density=density, scale=scale, sign_tie=sign_tie,
                      normalize=normalize, thresholds=thresholds, majority=majority)
