"""Every merge method on tiny models, against references written here in plain
dict-of-tensors maths (not the library's functions)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyft.merge.engine import MergeSpec, merge_models

ATOL = 1e-5


def make_variant(src: Path, dst: Path, seed: int, scale: float = 0.01) -> Path:
    """The tiny model with every weight perturbed by seeded noise, saved like a fine-tune."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of ~15 rows, so that every tensor here spans many blocks (and DARE's 64-row
    random blocks straddle them): the results must not depend on the blocking."""
    from polyft.merge import engine

    monkeypatch.setattr(engine, "BLOCK_ENTRIES", 1000)


@pytest.fixture(scope="session")
def variants(tiny_llama_dir, tmp_path_factory):
    """(base, [three fine-tune-like variants]) of the tiny Llama."""
    root = tmp_path_factory.mktemp("variants")
    return tiny_llama_dir, [make_variant(tiny_llama_dir, root / f"v{s}", s) for s in (1, 2, 3)]


def state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(tmp_path, method, models, base=None, vocab="strict", **params) -> dict[str, torch.Tensor]:
    out = Path(tempfile.mkdtemp(prefix=f"out-{method}-", dir=tmp_path))
    merge_models(MergeSpec(method=method, models=list(models), base=base, params=params, vocab=vocab), out)
    return state(out)


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=1e-5, msg=name)


# --------------------------------------------------------------- references

def ref_trim(tv: torch.Tensor, density: float) -> torch.Tensor:
    n = tv.numel()
    k = max(1, int(density * n))  # mergekit's count; entries tied with the k-th are all kept
    if k >= n:
        return tv.clone()
    thr = tv.abs().flatten().kthvalue(n - k + 1).values
    return torch.where(tv.abs() >= thr, tv, torch.zeros_like(tv))


def ref_sign_mean(vs: list[torch.Tensor], ws: list[float], normalize: bool = True):
    # A vote summing to exactly 0 elects + (mergekit's default); an entry joins when w * v has the sign.
    sign = torch.where(sum(w * v for v, w in zip(vs, ws)) >= 0, 1.0, -1.0)
    num = torch.zeros_like(vs[0])
    den = torch.zeros_like(vs[0])
    for v, w in zip(vs, ws):
        keep = torch.sign(w * v) == sign
        num += torch.where(keep, w * v, 0.0)
        den += torch.where(keep, w, 0.0)
    if not normalize:
        return num
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def ref_dare_mask(seed: int, name: str, index: int, shape, density: float) -> torch.Tensor:
    # The documented rule: the tensor as rows x the rest, cut in blocks of 64 rows; block b draws
    # torch.rand(64, row_size) from a generator seeded with sha256("seed:name:index:b")[:8] (LE, 63 bits).
    rows = shape[0] if len(shape) else 1
    cols = math.prod(shape) // rows
    draws = []
    for block in range(math.ceil(rows / 64)):
        h = hashlib.sha256(f"{seed}:{name}:{index}:{block}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") % 2**63)
        draws.append(torch.rand(64, cols, generator=g))
    return (torch.cat(draws)[:rows] < density).reshape(shape)


LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


# --------------------------------------------------------------- methods

def test_linear(variants, tmp_path):
    _, vs = variants
    sd = [state(v) for v in vs]
    got = run(tmp_path, "linear", vs, weights=[1.0, 2.0, 3.0], normalize=True)
    assert_close(got, {k: (sd[0][k] + 2 * sd[1][k] + 3 * sd[2][k]) / 6 for k in sd[0]})
    got = run(tmp_path, "linear", vs[:2], weights=[0.5, 0.25], normalize=False)
    assert_close(got, {k: 0.5 * sd[0][k] + 0.25 * sd[1][k] for k in sd[0]})


def test_task_arithmetic(variants, tmp_path):
    base, vs = variants
    b, sd = state(base), [state(v) for v in vs[:2]]
    got = run(tmp_path, "task_arithmetic", vs[:2], base, weights=[1.0, 0.5], scale=0.7)
    assert_close(got, {k: b[k] + 0.7 * ((sd[0][k] - b[k]) + 0.5 * (sd[1][k] - b[k])) for k in b})


def test_ties(variants, tmp_path):
    base, vs = variants
    b, sd = state(base), [state(v) for v in vs]
    got = run(tmp_path, "ties", vs, base, weights=[1.0, 1.0, 2.0], density=0.3, scale=0.9)
    want = {}
    for k in b:
        trimmed = [ref_trim(s[k] - b[k], 0.3) for s in sd]
        want[k] = b[k] + 0.9 * ref_sign_mean(trimmed, [1.0, 1.0, 2.0])
    assert_close(got, want)


def test_ties_trims_exactly_the_top_k(variants, tmp_path):
    """density=1 keeps everything: TIES is then sign election over full task vectors."""
    base, vs = variants
    b, sd = state(base), [state(v) for v in vs[:2]]
    got = run(tmp_path, "ties", vs[:2], base, density=1.0, scale=1.0)
    assert_close(got, {k: b[k] + ref_sign_mean([s[k] - b[k] for s in sd], [1.0, 1.0]) for k in b})
    from polyft.merge.ties import topk_mask

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for density in (0.001, 0.1, 0.37, 0.5, 0.999):
        mask = topk_mask(x, density)
        k = max(1, int(density * 1000))
        assert int(mask.sum()) == k
        assert set(mask.nonzero().flatten().tolist()) == set(x.abs().topk(k).indices.tolist())


def test_ties_sv(variants, tmp_path):
    base, vs = variants
    b, sd = state(base), [state(v) for v in vs[:2]]  # vs[0] is the SFT model
    xi, density = 0.4, 0.3
    got_dir = tmp_path / "sv"
    got_dir.mkdir()
    result = merge_models(MergeSpec("ties_sv", vs[:2], base,
                                    {"density": density, "scale": 1.0, "slack": xi}), got_dir)
    want, topk, kept = {}, 0, 0
    for k in b:
        tv_sft, tv_ct = sd[0][k] - b[k], sd[1][k] - b[k]
        t_sft, t_ct = ref_trim(tv_sft, density), ref_trim(tv_ct, density)
        sign = torch.where(t_sft + t_ct >= 0, 1.0, -1.0)
        agree_sft = torch.sign(t_sft) == sign
        agree_ct = torch.sign(t_ct) == sign
        rescue = (t_sft != 0) & ~agree_sft & (t_sft.abs() >= (1 - xi) * t_ct.abs())
        keep_sft = agree_sft | rescue
        num = torch.where(keep_sft, t_sft, 0.0) + torch.where(agree_ct, t_ct, 0.0)
        den = keep_sft.float() + agree_ct.float()
        want[k] = b[k] + torch.where(den > 0, num / den.clamp_min(1), 0.0)
        topk += int((t_sft != 0).sum())
        kept += int(keep_sft.sum())
    assert_close(state(got_dir), want)
    diag = result["diagnostics"]
    assert diag["sft_topk_entries"] == topk
    assert diag["sft_topk_kept_fraction"] == pytest.approx(kept / topk)
    assert 0 < diag["sft_rescued_by_slack"] and diag["sft_topk_kept_fraction"] < 1


def test_ties_sv_without_slack_is_ties(variants, tmp_path):
    base, vs = variants
    a = run(tmp_path, "ties_sv", vs[:2], base, density=0.3, scale=1.0, slack=0.0)
    b = run(tmp_path, "ties", vs[:2], base, density=0.3, scale=1.0)
    assert_close(a, b)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare(variants, tmp_path, method):
    base, vs = variants
    b, sd = state(base), [state(v) for v in vs[:2]]
    density, seed = 0.4, 7
    got = run(tmp_path, method, vs[:2], base, weights=[1.0, 0.5], density=density, scale=0.8, seed=seed)
    want = {}
    for k in b:
        sparse = [torch.where(ref_dare_mask(seed, k, i, b[k].shape, density), (s[k] - b[k]) / density, 0.0)
                  for i, s in enumerate(sd)]
        # dare_ties sums the agreeing entries undivided (mergekit's default, normalize=false)
        merged = sparse[0] + 0.5 * sparse[1] if method == "dare_linear" else \
            ref_sign_mean(sparse, [1.0, 0.5], normalize=False)
        want[k] = b[k] + 0.8 * merged
    assert_close(got, want)


def test_dare_is_deterministic_for_a_seed(variants, tmp_path):
    base, vs = variants
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        d = tmp_path / f"s{i}"
        d.mkdir()
        merge_models(MergeSpec("dare_ties", vs[:2], base, {"density": 0.5, "seed": seed}), d)
        outs.append((d / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_slerp(variants, tmp_path):
    _, vs = variants
    a, c = state(vs[0]), state(vs[1])
    got = run(tmp_path, "slerp", vs[:2], t=0.3)
    want = {}
    for k in a:
        x, y = a[k].double().flatten(), c[k].double().flatten()
        cos = float(x @ y / (x.norm() * y.norm()))
        om = math.acos(min(1.0, max(-1.0, cos)))
        if abs(cos) > 1 - 1e-6:
            want[k] = 0.7 * a[k] + 0.3 * c[k]
        else:
            want[k] = (math.sin(0.7 * om) * a[k] + math.sin(0.3 * om) * c[k]) / math.sin(om)
    assert_close(got, want)
    # the endpoints are the models themselves
    assert_close(run(tmp_path, "slerp", vs[:2], t=0.0), a)
    assert_close(run(tmp_path, "slerp", vs[:2], t=1.0), c)


def test_gradient_parameters_follow_layer_depth(variants, tmp_path):
    """weights=[[0, 1], 1]: model 0's weight goes 0 -> 1 from the first layer to the last;
    tensors outside the layers take the mean of the anchors (0.5)."""
    _, vs = variants
    a, c = state(vs[0]), state(vs[1])
    got = run(tmp_path, "linear", vs[:2], weights=[[0.0, 1.0], 1.0], normalize=False)
    n = 6
    for k in a:
        m = LAYER_RE.match(k)
        w = int(m.group(1)) / (n - 1) if m else 0.5
        torch.testing.assert_close(got[k], w * a[k] + c[k], atol=ATOL, rtol=1e-5, msg=k)
    # three anchors: 0 at layer 0, 1 at layer 2.5, 0 at layer 5 -> layer 1 gets 0.4
    got, b = run(tmp_path, "task_arithmetic", vs[:1], variants[0], scale=[0.0, 1.0, 0.0]), state(variants[0])
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[k], b[k] + 0.4 * (a[k] - b[k]), atol=ATOL, rtol=1e-5)
    k = "lm_head.weight"
    torch.testing.assert_close(got[k], b[k] + (1 / 3) * (a[k] - b[k]), atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------- layer swapping

def expected_zone(layer: int, n: int, b: int, tb: int, tt: int, u: int) -> str:
    if layer < b:
        return "outer"
    if layer < b + tb:
        return "blend"
    if layer < n - u - tt:
        return "middle"
    if layer < n - u:
        return "blend"
    return "outer"


@pytest.mark.parametrize("non_layer", ["outer", "middle", "average"])
def test_layer_swap_every_zone(variants, tmp_path, non_layer):
    _, vs = variants
    mid, out = state(vs[0]), state(vs[1])
    b, tb, tt, u = 1, 1, 2, 1  # 6 layers: outer, blend, middle, blend, blend, outer
    got = run(tmp_path, "layer_swap", vs[:2], bottom=b, top=u, transition_bottom=tb, transition_top=tt,
              blend=[0.75, 0.25], non_layer=non_layer)
    seen = set()
    for k in mid:
        m = LAYER_RE.match(k)
        if m:
            zone = expected_zone(int(m.group(1)), 6, b, tb, tt, u)
            want = {"outer": out[k], "middle": mid[k], "blend": 0.75 * mid[k] + 0.25 * out[k]}[zone]
            seen.add(zone)
        else:
            want = {"outer": out[k], "middle": mid[k], "average": 0.5 * (mid[k] + out[k])}[non_layer]
        torch.testing.assert_close(got[k], want, atol=ATOL, rtol=1e-5, msg=k)
    assert seen == {"outer", "blend", "middle"}
    # a layer's norms travel with it
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(got[norm], out[norm])
    assert torch.equal(got["model.layers.2.post_attention_layernorm.weight"],
                       mid["model.layers.2.post_attention_layernorm.weight"])


def test_layer_swap_zone_table():
    from polyft.merge.layer_swap import zone

    for n in (4, 6, 32):
        for b, tb, tt, u in ((0, 0, 0, 0), (5, 1, 1, 2), (1, 0, 2, 1), (2, 2, 0, 0)):
            if b + tb + tt + u > n:
                continue
            for layer in range(n):
                assert zone(layer, n, b, u, tb, tt) == expected_zone(layer, n, b, tb, tt, u)


# --------------------------------------------------------------- inputs and outputs

def test_lora_adapter_is_folded_into_its_base(variants, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, vs = variants
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    folded = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    other = state(vs[1])
    out = tmp_path / "merged"
    out.mkdir()
    merge_models(MergeSpec("linear", [adapter, vs[1]]), out)
    assert_close(state(out), {k: 0.5 * (folded[k] + other[k]) for k in other})
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()  # the adapter saved none: its base's


def test_merged_model_loads_and_generates(variants, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, vs = variants
    out = tmp_path / "ties"
    out.mkdir()
    merge_models(MergeSpec("ties", vs[:2], base, {"density": 0.5}, dtype="bfloat16"), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("2 + 3 =", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_sharded_output_with_index_loads(variants, tmp_path):
    from transformers import AutoModelForCausalLM

    base, vs = variants
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    spec = dict(method="task_arithmetic", models=vs[:2], base=base, params={"scale": 0.5})
    merge_models(MergeSpec(**spec), one)
    merge_models(MergeSpec(**spec, shard_size=200_000), many)
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (many / "model.safetensors").exists()
    assert (many / "model.safetensors.index.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = AutoModelForCausalLM.from_pretrained(many).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vocab_first_keeps_the_first_models_rows(variants, tmp_path):
    from safetensors.torch import save_file

    base, vs = variants
    big = tmp_path / "big"
    big.mkdir()
    sd = state(vs[1])
    rows = sd["model.embed_tokens.weight"].shape[0]
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    extra = {k: torch.cat([v, torch.ones(8, v.shape[1])]) if k in vocab else v for k, v in sd.items()}
    save_file(extra, big / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((vs[1] / "config.json").read_text())
    conf["vocab_size"] += 8
    (big / "config.json").write_text(json.dumps(conf))
    a = state(vs[0])
    # the first model is smaller: the bigger one's extra rows are dropped
    assert_close(run(tmp_path, "linear", [vs[0], big], vocab="first"), {k: 0.5 * (a[k] + sd[k]) for k in a})
    # the first model is bigger: the smaller one borrows the first model's extra rows
    got = run(tmp_path, "linear", [big, vs[0]], vocab="first")
    for k in vocab:
        assert got[k].shape[0] == rows + 8
        torch.testing.assert_close(got[k][:rows], 0.5 * (sd[k] + a[k]), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got[k][rows:], torch.ones(8, got[k].shape[1]), atol=ATOL, rtol=1e-5)
    from polyft.errors import PolyftError

    with pytest.raises(PolyftError, match="vocabularies differ.*merge.vocab=first"):
        run(tmp_path, "linear", [vs[0], big])


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5, "seed": 1}),
    ("ties_sv", {"density": 0.3, "slack": 0.5}), ("slerp", {"t": 0.4})])
def test_results_do_not_depend_on_the_blocking(variants, tmp_path, monkeypatch, method, params):
    from polyft.merge import engine

    base, vs = variants
    base = None if method == "slerp" else base
    small = run(tmp_path, method, vs[:2], base, **params)
    monkeypatch.setattr(engine, "BLOCK_ENTRIES", 1 << 24)  # every tensor in one block
    assert_close(run(tmp_path, method, vs[:2], base, **params), small)
