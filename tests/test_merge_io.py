"""Reading and writing checkpoints for merges: headers, shards, raw copies, memory maps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polyft.errors import PolyftError
from polyft.merge import io
from polyft.merge.engine import MergeSpec, compare_layouts, merge_models, resolve_scalar


def write_model(path: Path, tensors: dict, model_type: str = "llama") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def tensors(seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.w": torch.randn(8, 4, generator=g).to(dtype) for i in range(3)} | {
        "model.embed_tokens.weight": torch.randn(16, 4, generator=g).to(dtype)}


def test_parse_size():
    assert io.parse_size("2GB") == 2_000_000_000
    assert io.parse_size("500MB") == 500_000_000
    assert io.parse_size("1GiB") == 2**30
    assert io.parse_size("1.5 kb") == 1500
    assert io.parse_size(1234) == 1234
    with pytest.raises(PolyftError, match="merge.shard_size=lots"):
        io.parse_size("lots")


def test_plan_shards_respects_the_size_and_keeps_order():
    ts = [io.OutTensor(f"t{i}", "F32", (n,), n * 4) for i, n in enumerate((10, 10, 30, 5, 5))]
    shards = io.plan_shards(ts, 80)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [[t.name for t in s] for s in io.plan_shards(ts, 1)] == [["t0"], ["t1"], ["t2"], ["t3"], ["t4"]]


def test_shard_writer_any_order_mixed_dtypes_and_raw_copies(tmp_path):
    src = write_model(tmp_path / "src", {"c": torch.arange(6, dtype=torch.int64)})
    info = io.Checkpoint(src).tensors["c"]
    want = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7),
            "odd": torch.ones(3, dtype=torch.float16), "c": torch.arange(6, dtype=torch.int64)}
    plan = [io.OutTensor(k, io.dtype_code(v.dtype), tuple(v.shape), v.numel() * v.element_size())
            for k, v in want.items()]
    out = tmp_path / "out"
    out.mkdir()
    w = io.ShardWriter(out, plan, shard_size=40)
    w.copy("c", info)
    for k in ("odd", "b", "a"):  # not in plan order
        w.write(k, want[k])
    names = w.finish()
    assert len(names) > 1 and (out / io.INDEX_FILE).is_file()
    index = json.loads((out / io.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(want)
    got = {}
    for f in names:
        header, start = io.read_header(out / f)
        for h in header.values():  # every tensor starts at a multiple of its element size
            assert (start + h["data_offsets"][0]) % io.DTYPE_SIZES[h["dtype"]] == 0
        got.update(load_file(out / f))
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_shard_writer_refuses_to_finish_incomplete(tmp_path):
    w = io.ShardWriter(tmp_path, [io.OutTensor("a", "F32", (2,), 8), io.OutTensor("b", "F32", (2,), 8)], 100)
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="no data for 1 tensors"):
        w.finish()
    w.close()


def test_copy_range_falls_back_to_pread(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(bytes(range(256)) * 10)
    monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(18, "EXDEV")))
    with open(tmp_path / "a", "rb") as s, open(tmp_path / "b", "wb") as d:
        io.copy_range(s.fileno(), d.fileno(), 100, 5, 1000)
    assert (tmp_path / "b").read_bytes()[5:] == (bytes(range(256)) * 10)[100:1100]


def test_checkpoint_reads_headers_in_shard_order_and_maps_one_tensor_at_a_time(tmp_path):
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    t = tensors()
    names = list(t)
    save_file({k: t[k] for k in names[:2]}, ck_dir / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in names[2:]}, ck_dir / "model-00002-of-00002.safetensors")
    (ck_dir / io.INDEX_FILE).write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}))
    ck = io.Checkpoint(ck_dir)
    files = [info.file.name for info in ck.tensors.values()]
    assert files == sorted(files)
    assert set(ck.tensors) == set(names)
    x = ck.load(names[3])
    assert torch.equal(x, t[names[3]])

    def mapped():
        return sum(str(ck_dir) in line for line in Path("/proc/self/maps").read_text().splitlines())

    assert mapped() >= 1  # the tensor lives in the memory-mapped file ...
    del x
    assert mapped() == 0  # ... and the mapping goes with it: no model stays mapped


def test_compare_layouts_names_the_tensor(tmp_path):
    a = io.Checkpoint(write_model(tmp_path / "a", tensors()))
    t = tensors(1)
    t["model.layers.1.w"] = torch.zeros(8, 5)
    b = io.Checkpoint(write_model(tmp_path / "b", t))
    with pytest.raises(PolyftError, match=r"model.layers.1.w has shape \[8, 4\] in A but \[8, 5\] in B"):
        compare_layouts([("A", a), ("B", b)])
    c = io.Checkpoint(write_model(tmp_path / "c", tensors(2, torch.bfloat16)))
    with pytest.raises(PolyftError, match="is F32 in A but BF16 in C"):
        compare_layouts([("A", a), ("C", c)])
    t = tensors(3)
    t.pop("model.layers.2.w")
    d = io.Checkpoint(write_model(tmp_path / "d", t))
    with pytest.raises(PolyftError, match="model.layers.2.w is in A but not in D"):
        compare_layouts([("A", a), ("D", d)])
    e = io.Checkpoint(write_model(tmp_path / "e", tensors(4), model_type="mistral"))
    with pytest.raises(PolyftError, match="A is a llama model but E is a mistral model"):
        compare_layouts([("A", a), ("E", e)])


def test_layer_swap_copies_whole_tensors_byte_for_byte(tmp_path):
    a = write_model(tmp_path / "a", tensors(0, torch.bfloat16))
    b = write_model(tmp_path / "b", tensors(1, torch.bfloat16))
    out = tmp_path / "out"
    out.mkdir()
    params = {"bottom": 1, "top": 1, "non_layer": "outer"}
    result = merge_models(MergeSpec("layer_swap", [a, b], params=params), out)
    assert result["copied_tensors"] == 4  # nothing computed: every tensor is a file-to-file copy
    got, ta, tb = load_file(out / "model.safetensors"), tensors(0, torch.bfloat16), tensors(1, torch.bfloat16)
    assert torch.equal(got["model.layers.0.w"], tb["model.layers.0.w"])
    assert torch.equal(got["model.layers.1.w"], ta["model.layers.1.w"])
    assert torch.equal(got["model.layers.2.w"], tb["model.layers.2.w"])
    assert torch.equal(got["model.embed_tokens.weight"], tb["model.embed_tokens.weight"])


def test_output_dtype_and_config(tmp_path):
    a = write_model(tmp_path / "a", tensors(0))
    b = write_model(tmp_path / "b", tensors(1))
    out = tmp_path / "out"
    out.mkdir()
    merge_models(MergeSpec("linear", [a, b], dtype="bfloat16"), out)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    want = {k: ((tensors(0)[k] + tensors(1)[k]) / 2).to(torch.bfloat16) for k in tensors()}
    got = load_file(out / "model.safetensors")
    for k in want:
        assert torch.equal(got[k], want[k])


def test_resolve_scalar_gradients():
    assert resolve_scalar(0.3, 2, 6) == 0.3
    assert resolve_scalar([0.0, 1.0], 0, 6) == 0.0
    assert resolve_scalar([0.0, 1.0], 5, 6) == 1.0
    assert resolve_scalar([0.0, 1.0], 2, 5) == pytest.approx(0.5)
    assert resolve_scalar([0.0, 1.0, 0.0], 1, 5) == pytest.approx(0.5)
    assert resolve_scalar([0.0, 1.0, 0.5], None, 5) == pytest.approx(0.5)  # outside the layers: the mean


def test_pickle_checkpoints_are_read_only_when_allowed(tmp_path):
    a = write_model(tmp_path / "a", tensors(0))
    b = tmp_path / "b"
    b.mkdir()
    torch.save(tensors(1), b / "pytorch_model.bin")
    (b / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PolyftError, match="no safetensors weights"):
        merge_models(MergeSpec("linear", [a, b]), out)
    merge_models(MergeSpec("linear", [a, b], allow_pickle=True), out)
    got = load_file(out / "model.safetensors")
    for k, v in tensors(0).items():
        torch.testing.assert_close(got[k], (v + tensors(1)[k]) / 2)
