"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

Each task vector tau_i = theta_i - base keeps its top-k entries by magnitude, k =
round(density * numel) (at least 1); entries tied with the k-th largest magnitude are kept
too, so trimming is a threshold and works chunk by chunk once the threshold is known. The
sign of every entry is elected from sum_i w_i trim(tau_i); the merged vector is the weighted
mean over the models whose trimmed entry is non-zero and agrees with the elected sign, and
theta = base + scale * merged. With equal weights this is the paper's disjoint mean.
"""

from __future__ import annotations

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
    return max(1, round(density * numel))


def prepare_thresholds(chunks, *, numel: int, density: float, **_) -> dict:
    """Engine hook: each task vector's trimming threshold, over the whole tensor."""
    n_models = len(next(iter(chunks()))[0])
    k = keep_count(density, numel)
    if k >= numel:
        return {"thresholds": [0.0] * n_models}  # keep everything

    def task_chunks():
        return ([t - base for t in tensors] for tensors, base in chunks())

    return {"thresholds": magnitude_thresholds(task_chunks, [k] * n_models)}


def topk_mask(tv, density: float, threshold: float | None = None):
    """Entries of `tv` whose magnitude is among the top `density` share (ties included)."""
    import torch

    if threshold is None:
        k = keep_count(density, tv.numel())
        if k >= tv.numel():
            return torch.ones_like(tv, dtype=torch.bool)
        threshold = magnitude_thresholds(lambda: iter([[tv]]), [k])[0]
    return tv.abs() >= threshold


def elect_sign(vectors, weights):
    """The sign of sum_i w_i v_i, entry by entry (0 where the sum is 0)."""
    return weighted_sum(vectors, weights).sign_()


def agrees(v, sign):
    """Entries of v that are non-zero and have the elected sign (which is then non-zero)."""
    return v * sign > 0


def disjoint_mean(vectors, weights, keep):
    """sum_i w_i v_i [keep_i] / sum_i w_i [keep_i], 0 where no model is kept."""
    import torch

    num = torch.zeros_like(vectors[0])
    den = torch.zeros_like(vectors[0])
    for v, w, k in zip(vectors, weights, keep):
        kf = k.to(num.dtype)
        num.addcmul_(v, kf, value=w)
        den.add_(kf, alpha=w)
    return num.div_(den.masked_fill_(den == 0, 1.0))


def trimmed_task_vectors(tensors, base, density, thresholds=None):
    """(trimmed task vectors, their top-k masks); every tensor here is freshly allocated."""
    trimmed, masks = [], []
    for i, t in enumerate(tensors):
        tv = t - base
        mask = topk_mask(tv, density, None if thresholds is None else thresholds[i])
        trimmed.append(tv.mul_(mask))
        masks.append(mask)
    return trimmed, masks


@register("ties", params=("weights", "scale", "density"), needs_base=True, prepare=prepare_thresholds)
def ties(tensors, base, *, weights, density, scale=1.0, thresholds=None):
    trimmed, _ = trimmed_task_vectors(tensors, base, density, thresholds)
    sign = elect_sign(trimmed, weights)
    merged = disjoint_mean(trimmed, weights, [agrees(v, sign) for v in trimmed])
    return merged.mul_(scale).add_(base)
