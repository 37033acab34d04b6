"""FLix adapter on the tiny model: routing in mixed batches, feature dropout, save/load,
composition to one PEFT LoRA (equal to FLix's own forward), unseen-language fallback."""

from __future__ import annotations

import json

import pytest
import torch

from polyft.adapters import flix
from polyft.errors import PolyftError

VALUES = {"task": ["instruct", "math"], "lang": ["de", "en", "sw", "ja"]}


def flix_cfg(**kw) -> flix.FlixConfig:
    base = dict(values=VALUES, ranks={"task": 4, "lang": 2}, alpha={"task": 8.0, "lang": 2.0},
                feature_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return flix.FlixConfig(**{**base, **kw})


def randomise(model, seed: int = 0) -> None:
    """B starts at zero (FLix = base at init); random B makes every feature visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flix.flix_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


@pytest.fixture
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    flix.inject(m, flix_cfg(base_model_name_or_path=str(tiny_llama_dir)))
    randomise(m)
    return m.eval()


SETS = [{"task": "math", "lang": "en"}, {"task": "instruct", "lang": "sw"},
        {"task": "math", "lang": "de"}, {"task": "instruct", "lang": "ja"}]


def ids(n=4, seq=12, seed=1):
    return torch.randint(5, 200, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_mixed_batch_equals_each_example_alone_and_features_matter(model):
    x = ids()
    with torch.no_grad():
        batch = model(x, flix_features=flix.encode(model.flix_config, SETS)).logits
        for i, fs in enumerate(SETS):
            alone = model(x[i:i + 1], flix_features=flix.encode(model.flix_config, [fs])).logits
            assert torch.allclose(batch[i], alone[0], atol=1e-5), i
        other = model(x[:1], flix_features=flix.encode(model.flix_config, [SETS[1]])).logits
    assert (other[0] - batch[0]).abs().max() > 1e-3  # another feature set, another output


def test_gradients_reach_only_the_features_an_example_carries(model):
    model.train()
    x = ids(n=1)
    out = model(x, labels=x, flix_features=flix.encode(model.flix_config, [{"task": "math", "lang": "sw"}]))
    out.loss.backward()
    carried = {"task_1", "lang_2"}  # math, sw
    for layer in flix.flix_layers(model).values():
        for key in layer.lora_A:
            ga, gb = layer.lora_A[key].grad, layer.lora_B[key].grad
            if key in carried:
                assert ga.abs().sum() > 0 and gb.abs().sum() > 0, key
            else:
                assert ga.abs().sum() == 0 and gb.abs().sum() == 0, key
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_feature_dropout_statistics():
    """Each feature dropped with probability p, at least one kept: with two present features
    P(a given one dropped) = p(1-p) + p^2/2, and no example loses both; absent stays absent."""
    p, n = 0.3, 200_000
    ids = torch.tensor([[0, 1]] * n + [[1, flix.ABSENT]] * n)
    out = flix.drop_features(ids, p, generator=torch.Generator().manual_seed(0))
    pair, single = out[:n], out[n:]
    expect = p * (1 - p) + p * p / 2
    for col in (0, 1):
        assert abs((pair[:, col] == flix.ABSENT).float().mean().item() - expect) < 0.005
    assert ((pair != flix.ABSENT).sum(1) >= 1).all()
    assert (single[:, 0] == 1).all() and (single[:, 1] == flix.ABSENT).all()  # a lone feature stays
    assert torch.equal(flix.drop_features(ids, 0.0), ids)


def test_dropout_applies_in_training_only_and_shares_one_draw_per_call(model):
    model.flix_config.feature_dropout = 0.5
    feats = flix.encode(model.flix_config, SETS * 64)
    model.eval()
    flix.set_features(model, feats)
    assert torch.equal(model.flix_router.gate, flix.gate_for(model.flix_config, feats))
    model.train()
    torch.manual_seed(3)
    flix.set_features(model, feats)
    dropped = (model.flix_router.gate == 0).float().mean().item()
    full = (flix.gate_for(model.flix_config, feats) == 0).float().mean().item()
    assert dropped > full  # some features dropped; the gate is what every layer reads


def test_save_load_round_trip(model, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    flix.save(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [flix.CONFIG_FILE, flix.WEIGHTS_FILE]
    conf = json.loads((tmp_path / "a" / flix.CONFIG_FILE).read_text())
    assert conf["values"] == VALUES and conf["ranks"] == {"task": 4, "lang": 2}
    fresh = flix.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), tmp_path / "a")
    x = ids()
    with torch.no_grad():
        a = model(x, flix_features=flix.encode(model.flix_config, SETS)).logits
        b = fresh.eval()(x, flix_features=flix.encode(fresh.flix_config, SETS)).logits
    assert torch.equal(a, b)


def test_missing_routing_is_an_error_not_the_base(model):
    model.flix_router.gate = None
    with pytest.raises(RuntimeError, match="without features"):
        model(ids(n=1))


@pytest.mark.parametrize("fs", [{"task": "math", "lang": "sw"}, {"task": "instruct", "lang": "de"}])
def test_composed_peft_lora_equals_flix_forward(model, tiny_llama_dir, tmp_path, fs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    flix.save(model, tmp_path / "a")
    rank = flix.compose_to_peft(tmp_path / "a", fs, tmp_path / "lora")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert rank == 6 and conf["r"] == 6 and conf["lora_alpha"] == 6
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                           tmp_path / "lora").eval()
    x = ids(n=2)
    with torch.no_grad():
        want = model(x, flix_features=flix.encode(model.flix_config, [fs, fs])).logits
        got = peft_model(x).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(x).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_layer_output_is_the_papers_sum(model):
    """h = W0 x + sum_f (alpha_f / r_f) B_f A_f x, with the scales written out from flix_cfg's
    numbers (task 8/4, lang 2/2), not from FlixConfig.scale, on a layer's recorded input."""
    layer_name, layer = next(iter(flix.flix_layers(model).items()))
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    fs = {"task": "math", "lang": "sw"}
    with torch.no_grad():
        model(ids(n=1), flix_features=flix.encode(model.flix_config, [fs]))
    handle.remove()
    x = seen["x"]
    task, lang = f"task_{VALUES['task'].index('math')}", f"lang_{VALUES['lang'].index('sw')}"
    with torch.no_grad():
        want = layer.base_layer(x)
        want = want + (8.0 / 4) * (x @ layer.lora_A[task].T) @ layer.lora_B[task].T
        want = want + (2.0 / 2) * (x @ layer.lora_A[lang].T) @ layer.lora_B[lang].T
    assert torch.allclose(seen["out"], want, atol=1e-6), layer_name
    assert (want - layer.base_layer(x)).abs().max() > 1e-3


def test_unseen_language_composes_the_task_alone(model, tmp_path):
    cfg = model.flix_config
    fs, notices = flix.resolve_feature_set(cfg, {"task": "math", "lang": "te"})
    assert fs == {"task": "math"} and len(notices) == 1 and "lang=te" in notices[0]
    flix.save(model, tmp_path / "a")
    assert flix.compose_to_peft(tmp_path / "a", fs, tmp_path / "lora") == 4
    x = ids(n=1)
    with torch.no_grad():
        alone = model(x, flix_features=torch.tensor([[1, flix.ABSENT]])).logits
    from peft import PeftModel

    base = type(model).from_pretrained(cfg.base_model_name_or_path, dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "lora").eval()(x).logits
    assert torch.allclose(got, alone, atol=1e-5)
    with pytest.raises(PolyftError, match="task=poetry: this task was never trained"):
        flix.resolve_feature_set(cfg, {"task": "poetry", "lang": "en"})


def test_report_groups_give_seen_and_held_out_rows():
    from polyft.commands.report import group_table, to_markdown

    def row(variant, task, lang, value, metric):
        return {"variant": variant, "model": variant, "task": task, "lang": lang, "metric": metric,
                "filter": "none", "value": value}

    rows = [row("flix", "demo_arith_en", "en", 0.5, "exact_match"), row("flix", "demo_arith_sw", "sw", 0.25, "exact_match"),
            row("flix", "demo_words_en", "en", 1.0, "acc"), row("flix", "demo_words_en", "en", 0.1, "acc_norm"),
            row("shared", "demo_arith_sw", "sw", 0.0, "exact_match")]
    t = group_table(rows, {"seen": ["demo_arith_en", "demo_words_en"], "held_out_pair": ["demo_arith_sw"]})
    assert t.columns() == ["demo_arith", "demo_words", "all"]
    assert t.rows["flix / seen"] == {"demo_arith": 0.5, "demo_words": 1.0, "all": 0.75}  # acc, not acc_norm
    assert t.rows["flix / held_out_pair"] == {"demo_arith": 0.25, "all": 0.25}
    assert t.rows["shared / held_out_pair"]["all"] == 0.0 and "shared / seen" not in t.rows
    assert "| flix / held_out_pair | 25.0 | — | 25.0 |" in to_markdown(t)
    assert group_table(rows, {}) is None


def test_init_from_copies_trained_values_and_leaves_new_ones_fresh(model, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    flix.save(model, tmp_path / "a")
    more = {"task": ["instruct", "math", "qa"], "lang": ["en", "te"]}
    cont = flix.inject(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                       flix_cfg(values=more))
    copied = flix.load_weights(cont, *flix.read(tmp_path / "a"))
    layers = len(model.flix_config.modules)
    assert copied == layers * 3  # instruct, math, en
    name = model.flix_config.modules[0]
    old, new = flix.flix_layers(model)[name], flix.flix_layers(cont)[name]
    assert torch.equal(new.lora_B["task_1"], old.lora_B["task_1"])  # math -> math
    assert torch.equal(new.lora_B["lang_0"], old.lora_B["lang_1"])  # en: index 1 before, 0 now
    assert new.lora_B["task_2"].abs().sum() == 0 and new.lora_B["lang_1"].abs().sum() == 0  # qa, te: fresh
