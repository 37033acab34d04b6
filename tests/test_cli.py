"""The CLI: help without heavy imports, and one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import assert_refused, assert_user_error

NO_TORCH = ("import sys, runpy; sys.argv = ['polyft'] + sys.argv[1:];\n"
            "try:\n    runpy.run_module('polyft.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')")


def _run_no_torch(*args, cwd):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=cwd, capture_output=True, text=True)


def test_top_level_help_lists_commands(tmp_path):
    proc = _run_no_torch("--help", cwd=tmp_path)
    for cmd in ("train", "merge", "eval", "run", "report"):
        assert f"  {cmd} " in proc.stdout
    assert proc.stdout.strip().endswith("NO_TORCH")


def test_train_help_shows_groups_without_torch(tmp_path):
    proc = _run_no_torch("train", "--help", cwd=tmp_path)
    for group in ("adapter=lora   options: flix, full, lora", "quant=none   options: 4bit, 8bit, none",
                  "model=tiny-llama", "data=demo", "train=demo"):
        assert group in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("NO_TORCH")
    assert not (tmp_path / "outputs").exists()


def test_config_error_path_is_fast_and_torch_free(tmp_path):
    proc = _run_no_torch("train", "adapter.r=0", cwd=tmp_path)
    assert "adapter.r" in proc.stderr
    assert proc.stdout.strip().endswith("NO_TORCH")


def test_cfg_job_prints_the_composed_config(cli):
    proc = cli("train", "adapter.r=16", "quant=4bit", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "r: 16" in proc.stdout and "bits: 4" in proc.stdout
    assert not (cli.cwd / "outputs" / "runs").exists()


def _bin_only_model(tmp_path, tiny_llama_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d)
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), d / "pytorch_model.bin")
    return d


BAD = {
    "unknown_group_option": (["adapter=nope"], ["adapter=nope", "lora"]),
    "unknown_key": (["adapter.foo=1"], ["adapter.foo", "alpha"]),
    "rank_zero": (["adapter.r=0"], ["adapter.r=0"]),
    "quant_3bit": (["quant=3bit"], ["quant=3bit", "4bit"]),
    "negative_weight": (["data.sources.math.weight=-1"], ["data.sources.math.weight", "> 0"]),
    "missing_data_file": (["data.sources.math.type=jsonl", "data.sources.math.path=/no/such.jsonl"],
                          ["/no/such.jsonl"]),
    "language_filter_empty": (["data.languages=[xx]"], ["data.languages", "en"]),
    "missing_model_path": (["model=llama-2-7b", "model.path=/no/such/model"], ["model.path=/no/such/model"]),
    "hub_id_offline": (["model=llama-2-7b"], ["meta-llama/Llama-2-7b-hf", "offline"]),
    "hub_data_offline": (["data=bactrian_x"], ["MBZUAI/Bactrian-X", "offline"]),
    "absent_target_modules": (["adapter.target_modules=[c_attn]"], ["adapter.target_modules", "c_attn"]),
    "zero_processes": (["train.num_processes=0"], ["train.num_processes"]),
    "full_on_quantised": (["adapter=full", "quant=4bit"], ["quant=4bit"]),
    "bad_type": (["train.max_steps=many"], ["train.max_steps"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(cli, case):
    args, words = BAD[case]
    assert_refused(cli, "train", *args, words=words)


def test_pickle_only_model_needs_allow_pickle(cli, tiny_llama_dir, tmp_path):
    model = _bin_only_model(tmp_path, tiny_llama_dir)
    assert_refused(cli, "train", "model=llama-2-7b", f"model.path={model}",
                   words=["allow_pickle", "pytorch_model.bin"])


def test_unknown_command(cli):
    assert_user_error(cli("fly"), "fly", "train")


def test_sweep_points_are_all_checked(cli):
    proc = cli("train", "-m", "adapter.r=4,0")
    assert_user_error(proc, "adapter.r=0")
    assert not (cli.cwd / "outputs" / "multirun").exists()
