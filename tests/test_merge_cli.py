"""`polyft merge` through the real CLI: products, reuse, sweeps, kills and user errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_refused


def make_variant(src: Path, dst: Path, seed: int) -> Path:
    """The tiny model with seeded noise on every weight, saved like a fine-tune."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    return {"base": tiny_llama_dir, "a": make_variant(tiny_llama_dir, root / "a", 11),
            "b": make_variant(tiny_llama_dir, root / "b", 12)}


def products(root: Path) -> list[Path]:
    d = root / "artifacts" / "merged"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def run_json(cwd: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((cwd / "outputs").rglob("run.json"))]


def test_merge_to_output_dir_then_reuse(cli, models):
    out = cli.cwd / "merged"
    args = ("merge", "merge=ties_sv", f"merge.models=[{models['a']},{models['b']}]",
            f"merge.base={models['base']}", "merge.density=0.5", "merge.slack=0.5", f"output_dir={out}")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    diag = manifest["merge"]["diagnostics"]
    assert 0 < diag["sft_topk_kept_fraction"] <= 1
    rec = run_json(cli.cwd)[0]
    assert rec["status"] == "ok" and rec["artifacts"][0]["reused"] is False
    assert rec["metrics"]["sft_topk_kept_fraction"] == diag["sft_topk_kept_fraction"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already built" in proc.stdout
    recs = run_json(cli.cwd)
    assert sorted(r["artifacts"][0]["reused"] for r in recs) == [False, True]


def test_layer_swap_sweep_gives_four_products(cli, models):
    proc = cli("merge", "-m", "merge=layer_swap", "merge.bottom=1,2", "merge.top=1,2",
               f"merge.middle={models['a']}", f"merge.outer={models['b']}", "output_root=store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = products(cli.cwd / "store")
    assert len(found) == 4 and all(p.name.startswith("layer_swap-") for p in found)
    keys = [json.loads((p / "manifest.json").read_text())["key"]["merge"] for p in found]
    assert sorted((k["bottom"], k["top"]) for k in keys) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # the same sweep again is served from the store
    proc = cli("merge", "-m", "merge=layer_swap", "merge.bottom=1,2", "merge.top=1,2",
               f"merge.middle={models['a']}", f"merge.outer={models['b']}", "output_root=store")
    assert proc.returncode == 0 and proc.stdout.count("already built") == 4


# The CLI with every tensor write followed by half a second, so that a merge can be killed
# midway: the slowness is the test's, patched in here, not a switch of polyft's.
SLOW_MERGE = """
import sys, time
from polyft.merge import io
write = io.ShardWriter.write
def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    time.sleep(0.5)
io.ShardWriter.write = slow_write
from polyft.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["output_dir", "store"])
def test_killed_merge_leaves_nothing_and_reruns(cli, models, where):
    out = cli.cwd / "killed"
    args = ["merge", "merge=linear", f"merge.models=[{models['a']},{models['b']}]", "output_root=store"]
    if where == "output_dir":
        args.append(f"output_dir={out}")
    parent = out.parent if where == "output_dir" else cli.cwd / "store" / "artifacts" / "merged"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *args], cwd=cli.cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(parent.glob(".tmp-*/model.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, "the merge ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.6)  # a few tensors are written, most are not
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert products(cli.cwd / "store") == []
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    product = out if where == "output_dir" else products(cli.cwd / "store")[0]
    assert (product / "manifest.json").is_file()
    assert not list(parent.glob(".tmp-*"))  # the killed run's debris is gone too


# ------------------------------------------------------------------ user errors

@pytest.fixture
def bad_shapes(models, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(models["b"] / "model.safetensors")
    sd["model.layers.3.mlp.up_proj.weight"] = torch.zeros(7, 64)
    d = tmp_path / "bad-shapes"
    d.mkdir()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text((models["b"] / "config.json").read_text())
    return d


@pytest.fixture
def pickled(models, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(load_file(models["b"] / "model.safetensors"), d / "pytorch_model.bin")
    (d / "config.json").write_text((models["b"] / "config.json").read_text())
    return d


def test_error_models_of_different_shapes(cli, models, bad_shapes):
    assert_refused(cli, "merge", f"merge.models=[{models['a']},{bad_shapes}]",
                   words=["model.layers.3.mlp.up_proj.weight", "[128, 64]", "[7, 64]"])


def test_error_missing_model_dir(cli, models):
    assert_refused(cli, "merge", f"merge.models=[{models['a']},/nonexistent/model]",
                   words=["merge.models[1]", "/nonexistent/model", "no such"])


def test_error_task_vector_method_without_base(cli, models):
    assert_refused(cli, "merge", "merge=ties", f"merge.models=[{models['a']},{models['b']}]",
                   words=["merge.base", "merge=ties"])


@pytest.mark.parametrize("density", ["0", "1.5", "[0.5,0]"])
def test_error_density_outside_unit_interval(cli, models, density):
    assert_refused(cli, "merge", "merge=dare_ties", f"merge.models=[{models['a']},{models['b']}]",
                   f"merge.base={models['base']}", f"merge.density={density}",
                   words=["merge.density", "(0, 1]"])


def test_error_swap_zones_exceed_layers(cli, models):
    assert_refused(cli, "merge", "merge=layer_swap",
                   f"merge.middle={models['a']}", f"merge.outer={models['b']}",
                   "merge.bottom=3", "merge.top=2", "merge.transition_bottom=1", "merge.transition_top=1",
                   words=["3 + 2 + 1 + 1 = 7", "have 6"])


def test_error_unknown_non_layer(cli, models):
    assert_refused(cli, "merge", "merge=layer_swap",
                   f"merge.middle={models['a']}", f"merge.outer={models['b']}",
                   "merge.non_layer=lang", words=["merge.non_layer=lang", "outer, middle, average"])


def test_error_pickle_checkpoint(cli, models, pickled):
    assert_refused(cli, "merge", f"merge.models=[{models['a']},{pickled}]",
                   words=["pickle", "allow_pickle=true", str(pickled)])


def test_error_unknown_method_lists_the_registered_ones(cli, models):
    assert_refused(cli, "merge", "merge.method=fisher", f"merge.models=[{models['a']},{models['b']}]",
                   words=["merge.method=fisher", "linear", "ties_sv", "layer_swap"])


def test_error_vocabulary_mismatch_says_how_to_resolve(cli, models, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(models["b"] / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(4, sd[k].shape[1])])
    d = tmp_path / "bigger-vocab"
    d.mkdir()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((models["b"] / "config.json").read_text())
    conf["vocab_size"] += 4
    (d / "config.json").write_text(json.dumps(conf))
    assert_refused(cli, "merge", f"merge.models=[{models['a']},{d}]",
                   words=["vocabularies differ", "merge.vocab=first"])
