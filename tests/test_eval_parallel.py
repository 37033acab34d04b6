"""Multi-GPU eval keys: vLLM tensor/data parallel and HF multi-device placement reach
lm-eval's own model classes; bad values are refused in one line."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import assert_user_error

GIB, GB = 2 ** 30, 10 ** 9


def _compose(cache_root: Path, *overrides: str):
    from polyft.cli.compose import compose
    from polyft.config.rules import validate

    cfg = compose("eval", [f"output_root={cache_root}", "eval.tasks=[demo_words_en]", *overrides])
    validate(cfg)
    return cfg


@pytest.fixture
def lora(tmp_path, tiny_llama_dir) -> Path:
    from test_eval import make_adapter

    return make_adapter(tiny_llama_dir, tmp_path / "lora", seed=3)


def _lm_eval_vllm_parameters() -> set[str]:
    """The named parameters of lm-eval's VLLM.__init__, read from its source: importing the
    module needs vllm, which needs a GPU. Names not among them would land in **kwargs and be
    passed to vLLM's LLM as engine arguments of their own."""
    source = Path(importlib.util.find_spec("lm_eval.models").submodule_search_locations[0]) / "vllm_causallms.py"
    cls = next(n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef) and n.name == "VLLM")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


def test_vllm_engine_args_carry_tensor_and_data_parallel(cache_root, lora, tiny_llama_dir):
    from polyft.commands.eval import _models, plan

    cfg = _compose(cache_root, f"eval.models=[base,{lora}]")
    p = plan(cfg, build=False)  # the models as the command resolves them (hf: vllm is not installed)
    with open_dict(cfg):
        cfg.eval.backend, cfg.eval.tensor_parallel_size, cfg.eval.data_parallel_size = "vllm", 2, 3
    args = _models(cfg, p).engine_args(str(tiny_llama_dir.resolve()))
    assert args["tensor_parallel_size"] == 2 and args["data_parallel_size"] == 3
    assert args["pretrained"] == str(tiny_llama_dir.resolve()) and args["lora_local_path"] == str(lora.resolve())
    assert set(args) <= _lm_eval_vllm_parameters(), set(args) - _lm_eval_vllm_parameters()


def test_hf_placement_is_lm_eval_parallelize(cache_root):
    """eval.parallelize=true gives from_pretrained what lm-eval's HFLM(parallelize=True) would
    (its own _get_accelerate_args, for 4 GPUs), sizes in bytes; off, one device as before."""
    from lm_eval.models.huggingface import HFLM

    from polyft.commands.eval import _models, plan

    bare = object.__new__(HFLM)  # the method reads no state but an accelerate launcher's
    for per_gpu, cpu in (("20GiB", "64GB"), ("20GiB", None)):
        overrides = ["eval.parallelize=true", f"eval.max_memory_per_gpu={per_gpu}"]
        overrides += [f"eval.max_cpu_memory={cpu}"] if cpu else []
        cfg = _compose(cache_root, *overrides)
        placed = _models(cfg, plan(cfg, build=False)).placement(gpus=4)
        ref = bare._get_accelerate_args(parallelize=True, device_map=None, max_memory_per_gpu=20 * GIB,
                                        max_cpu_memory=64 * GB if cpu else None, gpus=4)
        assert placed == {k: ref[k] for k in ("device_map", "max_memory")}
        assert placed["max_memory"] == {**dict.fromkeys(range(4), 20 * GIB), **({"cpu": 64 * GB} if cpu else {})}
    cfg = _compose(cache_root, "eval.device=cuda:1")
    assert _models(cfg, plan(cfg, build=False)).placement() == {"device_map": {"": "cuda:1"}}


def test_hf_parallelize_loads_through_accelerate_and_scores_the_same(cache_root, lora, tiny_llama_dir):
    """On this CPU host the real load path: device_map=auto places the model (on the CPU, the one
    device here), the adapter goes on it, HFLM gets it, and its logits equal the one-device
    model's; a CPU cap the model does not fit is refused in one line: the cap reaches accelerate."""
    import torch

    from polyft.commands.eval import _models, plan
    from polyft.errors import PolyftError
    from polyft.eval.models import release

    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    logits = {}
    for overrides in ([], ["eval.parallelize=true", "eval.max_cpu_memory=1GB"]):
        release()
        cfg = _compose(cache_root, f"eval.model={lora}", "eval.batch_size=2", *overrides)
        p = plan(cfg, build=False)
        lm = _models(cfg, p).lm(p.models[0])
        assert {prm.device.type for prm in lm.model.parameters()} == {"cpu"}
        with torch.no_grad():
            logits[bool(overrides)] = lm.model(ids).logits
    assert torch.equal(logits[True], logits[False])
    release()
    cfg = _compose(cache_root, "eval.parallelize=true", "eval.max_cpu_memory=100KB")
    p = plan(cfg, build=False)
    with pytest.raises(PolyftError, match=r"eval.parallelize: .* does not fit .*eval.max_cpu_memory=100KB"):
        _models(cfg, p).lm(p.models[0])
    release()


BAD = {
    "tp_zero": (["eval.backend=vllm", "eval.tensor_parallel_size=0"], ["eval.tensor_parallel_size=0", ">= 1"]),
    "dp_with_hf": (["eval.data_parallel_size=2"], ["eval.data_parallel_size=2", "eval.backend=vllm"]),
    "tp_splits_no_heads": (["eval.backend=vllm", "eval.tensor_parallel_size=3"],
                           ["eval.tensor_parallel_size=3", "4 attention heads"]),
    "parallelize_with_vllm": (["eval.backend=vllm", "eval.parallelize=true"], ["eval.parallelize=true", "eval.backend=hf"]),
    "parallelize_with_device": (["eval.parallelize=true", "eval.device=cuda:0"], ["eval.device=cuda:0"]),
    "memory_without_parallelize": (["eval.max_memory_per_gpu=70GiB"],
                                   ["eval.max_memory_per_gpu=70GiB", "eval.parallelize=true"]),
    "memory_not_a_size": (["eval.parallelize=true", "eval.max_memory_per_gpu=lots"],
                          ["eval.max_memory_per_gpu=lots", "70GiB"]),
    "tp_not_an_integer": (["eval.backend=vllm", "eval.tensor_parallel_size=two"], ["eval.tensor_parallel_size"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_parallel_values_exit_2_in_one_line(cli, tiny_llama_dir, case):
    args, words = BAD[case]
    out = cli.cwd / "out"
    proc = cli("eval", *args, f"output_dir={out}")
    assert_user_error(proc, *words)
    assert not out.exists() and not (cli.cwd / "outputs" / "runs").exists()


def test_tensor_parallel_that_splits_the_heads_passes_to_the_vllm_check(cli, tiny_llama_dir):
    """tensor_parallel_size=2 splits 4 heads and 2 KV heads: refused only for lack of vllm here."""
    assert_user_error(cli("eval", "eval.backend=vllm", "eval.tensor_parallel_size=2"), "vllm is not installed")
