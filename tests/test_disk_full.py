"""A disk that fills while polyft writes: a product (a merge), a checkpoint, an eval result.

The artifact store (outputs/artifacts) is a small tmpfs the test mounts, so that only the
writes under test meet the full disk; runs, models and caches stay on the ordinary disk.
Each time: one line naming what was written and what it needed, a non-zero exit, nothing
half-written left in the store, and the same command succeeds once there is space.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_user_error


@pytest.fixture
def small_disk(cli):
    """outputs/artifacts on a tmpfs; `resize(size)` changes its size (e.g. "256k")."""
    store = cli.cwd / "outputs" / "artifacts"
    store.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(store)], check=True)

    resize.store = store
    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def leftovers(store: Path, kind: str) -> list[str]:
    """What a failed build left in the store's `kind` directory (its lock files aside)."""
    d = store / kind
    return sorted(p.name for p in d.iterdir() if p.name != ".locks") if d.is_dir() else []


def assert_disk_full(proc, *words: str) -> None:
    assert_user_error(proc, "no space left on device", "it needs more than", *words)


def test_full_disk_during_a_merge_leaves_nothing_and_the_rerun_succeeds(cli, small_disk, tiny_llama_dir):
    other = cli.cwd / "copy"
    shutil.copytree(tiny_llama_dir, other)
    args = ["merge", "merge=linear", f"merge.models=[{tiny_llama_dir},{other}]"]
    small_disk("256k")  # the merged tiny model is ~1.5 MB
    proc = cli(*args)
    assert_disk_full(proc, str(small_disk.store / "merged" / "linear-"))
    assert leftovers(small_disk.store, "merged") == []
    assert shutil.disk_usage(small_disk.store).used < 64 << 10  # the temporary directory is gone

    small_disk("16m")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    (product,) = (small_disk.store / "merged").glob("linear-*")
    assert (product / "manifest.json").is_file() and list(product.glob("*.safetensors"))


def test_full_disk_during_a_checkpoint_leaves_no_half_checkpoint(cli, small_disk):
    args = ["train", "logger=none", "train.max_steps=4", "train.save_steps=2"]
    small_disk("96k")  # a LoRA checkpoint of the tiny model (weights, optimizer state) is ~300 kB
    proc = cli(*args)
    assert_disk_full(proc, "checkpoint", ".work")
    work = list((small_disk.store / "adapter" / ".work").glob("*"))
    assert [c for w in work for c in w.glob("checkpoint-*")] == []
    assert [n for n in leftovers(small_disk.store, "adapter") if n != ".work"] == []

    small_disk("16m")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    (product,) = [p for p in (small_disk.store / "adapter").glob("tiny-llama-lora-*")]
    assert (product / "adapter_model.safetensors").is_file()


def test_full_disk_during_an_eval_result_leaves_nothing(cli, small_disk):
    args = ["eval", "eval.tasks=[demo_words_en]", "eval.limit=2"]
    small_disk("256k")
    filler = small_disk.store / "filler"
    with open(filler, "wb") as fh:  # all but a few pages taken: the result's files do not fit
        try:
            fh.write(b"\0" * (256 << 10))
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - (8 << 10))
    proc = cli(*args)
    assert_disk_full(proc, f"the eval {small_disk.store / 'eval'}/")
    assert leftovers(small_disk.store, "eval") == []

    filler.unlink()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    (result,) = [p for p in (small_disk.store / "eval").iterdir() if p.name != ".locks"]
    assert (result / "results.jsonl").read_text().strip()
