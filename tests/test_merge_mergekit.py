"""polyft's TIES, TIES-SV and DARE-TIES against mergekit itself, on inputs built to hit the
cases where implementations part ways: sign votes that sum to exactly 0 (task vectors that
are exact opposites, frequent in bf16), entries where every model is 0, unequal weights.

Values are put on a coarse binary grid, so that theta_i = base + tau_i is exact in the
stored dtype and the task vectors read back are exactly the ones built (exact ties survive).
Both tools compute in float32 (merge.dtype=float32 / mergekit dtype: float32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polyft.merge.engine import MergeSpec, merge_models

mergekit = pytest.importorskip("mergekit")  # installed by `make test` (the dev extra)


def coarse(shape, g, step, ratio):
    """Small multiples of `step`: few significant bits, exact in bf16; magnitudes tie often."""
    def pick(lo, hi, unit):
        return torch.randint(lo, hi, shape, generator=g).float() * unit
    return pick(-32, 32, step), pick(-8, 8, step * ratio), pick(-8, 8, step)


def distinct(shape, g, step, ratio):
    """Every magnitude within a task vector distinct (tau_a: multiples of 2 * ratio * step, so
    tau_a / ratio is an even multiple of step; tau_b's own entries: odd multiples): no ties at a
    trimming threshold. Exact in fp32 for step = 2^-20 and tensors below 2^17 entries."""
    n = math.prod(shape)

    def signed(magnitudes):
        return magnitudes * (torch.randint(0, 2, (n,), generator=g).float() * 2 - 1)
    base = torch.randint(-2 ** 19, 2 ** 19, (n,), generator=g).float() * step
    ta = signed((torch.randperm(n, generator=g).float() + 1) * 2 * ratio * step)
    tb = signed((torch.randperm(n, generator=g).float() * 2 + 1) * step)
    return base.reshape(shape), ta.reshape(shape), tb.reshape(shape)


def build_models(template: Path, root: Path, dtype, values, step, ratio=1.0, seed=0) -> tuple[Path, list[Path]]:
    """base, a, b on the template's layout: on ~30% of entries tau_b = -tau_a / ratio exactly (the
    weighted vote w_a tau_a + w_b tau_b is 0 for weights (1, ratio)), on ~10% both are 0."""
    g = torch.Generator().manual_seed(seed)
    names = {n: t.shape for n, t in load_file(template / "model.safetensors").items()}
    base, a, b = {}, {}, {}
    for n, shape in names.items():
        b0, ta, tb = values(shape, g, step, ratio)
        u = torch.rand(shape, generator=g)
        tb = torch.where(u < 0.3, -ta / ratio, tb)
        zero = (u >= 0.3) & (u < 0.4)
        ta, tb = torch.where(zero, 0.0, ta), torch.where(zero, 0.0, tb)
        base[n], a[n], b[n] = b0, b0 + ta, b0 + tb
    out = []
    for name, sd in (("base", base), ("a", a), ("b", b)):
        d = root / name
        d.mkdir(parents=True)
        stored = {n: t.to(dtype) for n, t in sd.items()}
        for n, t in sd.items():
            assert torch.equal(stored[n].float(), t), "grid value not exact in the stored dtype"
        save_file(stored, d / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((template / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
        (d / "config.json").write_text(json.dumps(cfg))
        out.append(d)
    return out[0], out[1:]


def state(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_mergekit(method: str, base: Path, models: list[Path], weights, density, out: Path, **params) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": w, "density": density}}
                   for m, w in zip(models, weights)],
        "parameters": params})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return state(out)


def run_polyft(method: str, base: Path, models: list[Path], out: Path, **params) -> dict:
    out.mkdir()
    merge_models(MergeSpec(method=method, models=list(models), base=base, params=params, dtype="float32"), out)
    return state(out)


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=n)


def count_ties(base: Path, models: list[Path], weights) -> int:
    b, sd = state(base), [state(m) for m in models]
    return sum(int((sum(w * (s[n].float() - b[n].float()) for s, w in zip(sd, weights)) == 0).sum()) for n in b)


@pytest.fixture(scope="module")
def bf16_models(tiny_llama_dir, tmp_path_factory):
    return build_models(tiny_llama_dir, tmp_path_factory.mktemp("bf16"), torch.bfloat16, coarse, 2.0 ** -6)


@pytest.fixture(scope="module")
def fp32_models(tiny_llama_dir, tmp_path_factory):
    # no two entries of a task vector tie in magnitude, weighted votes still tie
    return build_models(tiny_llama_dir, tmp_path_factory.mktemp("fp32"), torch.float32, distinct, 2.0 ** -20,
                        ratio=2.0, seed=1)


def test_ties_equals_mergekit_on_exact_ties_in_bf16(bf16_models, tmp_path):
    base, models = bf16_models
    assert count_ties(base, models, [1.0, 1.0]) > 0.35 * sum(t.numel() for t in state(base).values())
    want = run_mergekit("ties", base, models, [1.0, 1.0], 1.0, tmp_path / "mk")
    assert_same(run_polyft("ties", base, models, tmp_path / "pf", density=1.0), want)
    # TIES-SV with slack 0 is TIES exactly, at exact ties too
    assert_same(run_polyft("ties_sv", base, models, tmp_path / "sv0", density=1.0, slack=0.0), want)


def test_ties_and_ties_sv_equal_mergekit_with_trimming_and_weights(fp32_models, tmp_path):
    base, models = fp32_models
    weights = [1.0, 2.0]  # tau_b = -tau_a / 2 on 30%: the weighted vote ties there
    assert count_ties(base, models, weights) > 0
    want = run_mergekit("ties", base, models, weights, 0.5, tmp_path / "mk")
    assert_same(run_polyft("ties", base, models, tmp_path / "pf", density=0.5, weights=weights), want)
    assert_same(run_polyft("ties_sv", base, models, tmp_path / "sv0", density=0.5, weights=weights, slack=0.0),
                want)
    # normalize=false sums the kept entries, as mergekit's option does
    want_sum = run_mergekit("ties", base, models, weights, 0.5, tmp_path / "mk-sum", normalize=False)
    assert_same(run_polyft("ties", base, models, tmp_path / "pf-sum", density=0.5, weights=weights,
                           normalize=False), want_sum)
    # a positive slack keeps SFT entries mergekit's TIES drops, and only those
    sv = run_polyft("ties_sv", base, models, tmp_path / "sv", density=0.5, weights=weights, slack=0.5)
    assert any(not torch.equal(sv[n], want[n]) for n in want)


def test_dare_ties_equals_mergekit_without_drops(bf16_models, tmp_path):
    """density 1 drops nothing (mergekit's random mask cannot be reproduced): what is left is
    the sign consensus and mergekit's default of no normalisation."""
    base, models = bf16_models
    want = run_mergekit("dare_ties", base, models, [1.0, 0.5], 1.0, tmp_path / "mk")
    assert_same(run_polyft("dare_ties", base, models, tmp_path / "pf", density=1.0, weights=[1.0, 0.5]), want)
    want_norm = run_mergekit("dare_ties", base, models, [1.0, 0.5], 1.0, tmp_path / "mk-n", normalize=True)
    assert_same(run_polyft("dare_ties", base, models, tmp_path / "pf-n", density=1.0, weights=[1.0, 0.5],
                           normalize=True), want_norm)


def test_majority_rule_is_the_ties_authors_and_differs_from_mergekit_only_at_ties(bf16_models, tmp_path):
    """sign_tie=majority: a tied vote takes the sign of the sum of the elected signs over the
    tensor (the TIES authors' resolve_zero_signs, applied per tensor), written out here."""
    base, models = bf16_models
    b, sd = state(base), [state(m) for m in models]
    got = run_polyft("ties", base, models, tmp_path / "maj", density=1.0, sign_tie="majority")
    positive = run_polyft("ties", base, models, tmp_path / "pos", density=1.0)
    differs = 0
    for n in b:
        tv = torch.stack([s[n].float() - b[n].float() for s in sd])
        elected = torch.sign(tv.sum(0))
        majority = torch.sign(elected.sum())
        elected[elected == 0] = majority
        keep = torch.where(elected > 0, tv > 0, tv < 0)
        count = keep.sum(0).float()
        want = b[n].float() + (tv * keep).sum(0) / count.clamp(min=1)
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7, msg=n)
        tied = tv.sum(0) == 0
        assert torch.equal(got[n][~tied], positive[n][~tied])
        differs += int((got[n] != positive[n]).sum())
    assert differs > 0  # some tensors elect - by majority, where mergekit's rule says +


def test_polyft_keeps_every_entry_tied_at_the_trimming_threshold(bf16_models, tmp_path):
    """The one deliberate difference: on the bf16 grid many magnitudes tie with the k-th largest;
    polyft keeps them all (order-free, streamable), mergekit keeps exactly k by its sort order.
    Entries where the two differ are all at a tensor's threshold magnitude in some model."""
    base, models = bf16_models
    want = run_mergekit("ties", base, models, [1.0, 1.0], 0.3, tmp_path / "mk")
    got = run_polyft("ties", base, models, tmp_path / "pf", density=0.3)
    b, sd = state(base), [state(m) for m in models]
    differing = 0
    for n in b:
        diff = got[n] != want[n]
        if not diff.any():
            continue
        differing += int(diff.sum())
        at_threshold = torch.zeros_like(diff)
        for s in sd:
            mag = (s[n].float() - b[n].float()).abs().flatten()
            k = max(1, int(0.3 * mag.numel()))
            thr = mag.kthvalue(mag.numel() - k + 1).values
            at_threshold |= (s[n].float() - b[n].float()).abs() == thr
        assert bool(at_threshold[diff].all()), n
    assert differing > 0

