"""Checkpoint reading and writing for merges, apart from the maths.

Reading: safetensors headers are parsed with plain json (no torch, so the CLI's checks
stay cheap). A tensor is read through `safe_open`, memory-mapped, and the file is closed
again at once, so the process maps one tensor per input at a time: peak memory follows
the largest tensor, not the model. A LoRA adapter directory reads as its base with the
adapter folded in, tensor by tensor.

Writing: the output layout (shards, headers, byte offsets) is fixed from the input headers
before any tensor is computed, so each tensor can be written at its final offset by any
thread, in any order. A tensor taken unchanged from an input with the output dtype is
copied file to file in the kernel (copy_file_range), never entering the process; neighbours
in both files go in one call, and a shard's header is padded so that such tensors keep their
offset within a page (measured on ext4: a copy between page-misaligned offsets takes 1.4x as
long, and a call per tensor 1.15x as long as one per run of tensors).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from polyft.errors import PolyftError
from polyft.runs import resolve_base

# safetensors dtype codes and their sizes in bytes
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# merge.dtype names -> safetensors codes
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16",
               "float16": "F16", "fp16": "F16"}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "spiece.model", "vocab.txt")
INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
          "G": 10**9, "T": 10**12}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Bytes copied by one call at most: a merge that fails elsewhere stops its copier soon.
COPY_SPAN = 256 << 20


def parse_size(text) -> int:
    """'2GB' -> 2_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise PolyftError(f"merge.shard_size={text}: not a size; write e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def torch_dtype(code: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}[code]


def dtype_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    codes = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
    if name not in codes:
        raise PolyftError(f"tensor dtype {name} is not supported by polyft merge")
    return codes[name]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    file: Path | None = None  # None: computed on load (folded adapter, pickle checkpoint)
    start: int = 0  # absolute byte offset in `file`
    nbytes: int = 0


def read_header(file: str | os.PathLike) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise PolyftError(f"{file}: not a safetensors file (too short)")
        size = int.from_bytes(raw, "little")
        if size > 100_000_000:
            raise PolyftError(f"{file}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            raise PolyftError(f"{file}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory in shard order (the index's files if it has one)."""
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    return sorted(path.glob("*.safetensors"))


def scan_safetensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of `files`, in file order and, within a file, in data order."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        header, data_start = read_header(f)
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = h["data_offsets"]
            out[name] = TensorInfo(name, h["dtype"], tuple(h["shape"]), f, data_start + begin, end - begin)
    return out


def read_config(path: Path) -> dict:
    f = path / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


class Checkpoint:
    """A Hugging Face model directory with safetensors weights."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.tensors = scan_safetensors(safetensors_files(self.path))

    def load(self, name: str):
        """The tensor in its stored dtype, memory-mapped; the file is closed right away so
        that its pages leave the process with the tensor."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(name)

    def raw(self, name: str) -> TensorInfo | None:
        """Where the tensor's bytes lie in a file, if they can be copied as they are."""
        return self.tensors[name]


class PickleCheckpoint(Checkpoint):
    """.bin/.pt weights, read only when allow_pickle=true (torch.load, weights only, mmap)."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = Path(path)
        self.config = read_config(self.path)
        self._state = {}
        for f in sorted(list(self.path.glob("*.bin")) + list(self.path.glob("*.pt"))):
            self._state.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        self.tensors = {k: TensorInfo(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in self._state.items()}

    def load(self, name: str):
        return self._state[name]

    def raw(self, name: str) -> None:
        return None


ADAPTER_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.lora_([AB])\.weight$")
_DORA = ".lora_magnitude_vector"


def torch_linalg_norm(weight):
    """The L2 norm of each row, in the weight's dtype (peft's DoRA weight norm)."""
    import torch

    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class LoraCheckpoint(Checkpoint):
    """A peft LoRA adapter directory read as its base model with the adapter folded in:
    W + (alpha / r) B A for every adapted linear layer (alpha / sqrt(r) with rslora), DoRA's
    m / ||W + (alpha / r) B A|| (norm of each output row) times that, and modules_to_save
    tensors replacing the base's."""

    def __init__(self, path: str | os.PathLike, base: Checkpoint):
        self.path = Path(path)
        self.base = base
        self.config = base.config
        conf = json.loads((self.path / "adapter_config.json").read_text())
        self.adapter_config = conf
        self._file = self.path / "adapter_model.safetensors"
        header, _ = read_header(self._file)
        self.pairs: dict[str, tuple[str, str]] = {}  # base tensor name -> (A key, B key)
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter key
        self.magnitudes: dict[str, str] = {}  # base tensor name -> DoRA magnitude key
        for key in header:
            name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
            m = _LORA.match(name)
            if name.endswith(_DORA) and not conf.get("fan_in_fan_out"):
                self.magnitudes[f"{name[:-len(_DORA)]}.weight"] = key
            elif m:
                a, b = self.pairs.get(f"{m.group(1)}.weight", (None, None))
                self.pairs[f"{m.group(1)}.weight"] = (key, b) if m.group(2) == "A" else (a, key)
            elif name in base.tensors:
                self.replaced[name] = key
            else:
                raise PolyftError(f"adapter {self.path}: tensor {key} is neither a LoRA A/B weight nor a "
                                  "tensor of the base model; only plain LoRA adapters can be folded")
        self.tensors = dict(base.tensors)
        for name, key in self.replaced.items():
            h = header[key]
            self.tensors[name] = TensorInfo(name, h["dtype"], tuple(h["shape"]))
        for name, (a, b) in self.pairs.items():
            if a is None or b is None or name not in base.tensors:
                raise PolyftError(f"adapter {self.path}: LoRA weights for {name} do not match the base model "
                                  f"{base.path} (missing lora_A/lora_B or no such base tensor)")
            self.tensors[name] = TensorInfo(name, base.tensors[name].dtype, base.tensors[name].shape)
        if set(self.magnitudes) - set(self.pairs):
            raise PolyftError(f"adapter {self.path}: a DoRA magnitude for {sorted(set(self.magnitudes) - set(self.pairs))[0]} "
                              "has no LoRA weights beside it")

    def scaling(self, name: str, rank: int) -> float:
        conf = self.adapter_config
        module = name[: -len(".weight")]
        alpha = conf.get("lora_alpha", rank)
        for pattern, value in (conf.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                alpha = value
                break
        return alpha / (rank ** 0.5 if conf.get("use_rslora") else rank)

    def load(self, name: str):
        from safetensors import safe_open

        if name in self.replaced:
            with safe_open(self._file, framework="pt") as f:
                return f.get_tensor(self.replaced[name])
        w = self.base.load(name)
        if name not in self.pairs:
            return w
        with safe_open(self._file, framework="pt") as f:
            a, b = (f.get_tensor(k).float() for k in self.pairs[name])
            magnitude = f.get_tensor(self.magnitudes[name]).float() if name in self.magnitudes else None
        delta = b @ a
        if self.adapter_config.get("fan_in_fan_out"):
            delta = delta.T
        merged = delta.mul_(self.scaling(name, a.shape[0])).add_(w.float())
        if magnitude is not None:  # DoRA, as peft merges it: the row norms of the unmerged sum
            merged.mul_((magnitude / torch_linalg_norm(merged)).view(-1, 1))
        return merged

    def raw(self, name: str) -> TensorInfo | None:
        if name in self.pairs or name in self.replaced:
            return None
        return self.base.raw(name)


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def adapter_base_ref(path: Path) -> str:
    """The adapter's base, a relative reference taken from the adapter's directory."""
    ref = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return resolve_base(path, ref) or ""


def open_checkpoint(path: str | os.PathLike, adapter_base: str | os.PathLike | None = None,
                    allow_pickle: bool = False) -> Checkpoint:
    """The right reader for a directory: an adapter (folded into `adapter_base`, default its
    base_model_name_or_path), safetensors weights, or (allowed only) pickle weights."""
    p = Path(path)
    if is_adapter_dir(p):
        base = open_checkpoint(adapter_base or adapter_base_ref(p), allow_pickle=allow_pickle)
        return LoraCheckpoint(p, base)
    if safetensors_files(p):
        return Checkpoint(p)
    if allow_pickle:
        return PickleCheckpoint(p)
    raise PolyftError(f"{p} holds no safetensors weights")


# ------------------------------------------------------------------------------ writing

@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute offset in the shard file


def plan_shards(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    """Split `tensors` (in order) into shards of at most `shard_size` bytes (a larger tensor
    gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes planned safetensors shards; tensors may arrive in any order, from any thread.

    Each shard file is created with its header in place, at its final size when computed
    tensors will land in it; `write` and `copy` fill a tensor's bytes at its planned offset
    (pwrite / copy_file_range), so nothing is buffered. `finish` checks that every tensor
    arrived and writes the index. `sources` (name -> where its bytes lie in an input) names
    the tensors that will be copied, so that the header can put them page-aligned with
    their input."""

    def __init__(self, out_dir: str | os.PathLike, tensors: list[OutTensor], shard_size: int, on_done=None,
                 sources: dict[str, TensorInfo] | None = None):
        self.dir = Path(out_dir)
        self.on_done = on_done  # called with a tensor's name when all its bytes are in place
        self.shards = plan_shards(tensors, shard_size)
        self.by_name: dict[str, OutTensor] = {}
        self.fds: list[int] = []
        self.names = [shard_name(k, len(self.shards)) for k in range(len(self.shards))]
        self.pending = set()
        self.written: dict[str, int] = {}
        self.lock = threading.Lock()
        for k, shard in enumerate(self.shards):
            # Wider elements first, so every tensor starts at a multiple of its element size.
            shard.sort(key=lambda t: -DTYPE_SIZES[t.dtype])
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for t in shard:
                header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                t.shard, t.offset = k, offset
                offset += t.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            blob += b" " * (_data_start(8 + len(blob), shard, sources or {}) - 8 - len(blob))
            fd = os.open(self.dir / self.names[k], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, len(blob).to_bytes(8, "little") + blob, 0)
            # A shard of copies only is written front to back by one copier and grows as cp's
            # output does; sizing it first measured 10-20% slower on ext4. Either way the
            # file ends at its last tensor once every tensor is in (finish() checks that).
            if not all(t.name in (sources or {}) for t in shard):
                os.ftruncate(fd, 8 + len(blob) + offset)
            for t in shard:
                t.offset += 8 + len(blob)
                self.by_name[t.name] = t
                self.pending.add(t.name)

    def _done(self, name: str) -> None:
        self.pending.discard(name)
        if self.on_done is not None:
            self.on_done(name)

    def write(self, name: str, tensor, start: int = 0) -> None:
        """Write `tensor` (in the planned dtype; the whole tensor or a part of it that begins
        `start` bytes into it) at its place."""
        t = self.by_name[name]
        data = tensor.contiguous().reshape(-1).view(_u8()).numpy()
        if start + data.nbytes > t.nbytes:
            raise RuntimeError(f"{name}: bytes {start}..{start + data.nbytes} written, {t.nbytes} planned")
        view, pos = memoryview(data), 0
        while pos < data.nbytes:
            pos += os.pwrite(self.fds[t.shard], view[pos:], t.offset + start + pos)
        with self.lock:
            self.written[name] = self.written.get(name, 0) + data.nbytes
            complete = self.written[name] == t.nbytes
        if complete:
            self._done(name)

    def copy(self, name: str, src: TensorInfo) -> None:
        """Copy a tensor's bytes straight from an input file."""
        self.copy_many([(name, src)])

    def copy_many(self, items: list[tuple[str, TensorInfo]], stop: threading.Event | None = None) -> None:
        """Copy tensors' bytes straight from input files, in the order given; a run of them
        that lies back to back in one input and in one shard is copied by one call. Returns
        early, between calls, once `stop` is set."""
        spans: list[list] = []  # [input file, shard, input offset, shard offset, bytes, names]
        for name, src in items:
            t = self.by_name[name]
            if src.nbytes != t.nbytes or src.file is None:
                raise RuntimeError(f"{name}: cannot copy {src.nbytes} bytes into {t.nbytes}")
            last = spans[-1] if spans else None
            if (last is not None and last[0] == src.file and last[1] == t.shard and last[4] + t.nbytes <= COPY_SPAN
                    and last[2] + last[4] == src.start and last[3] + last[4] == t.offset):
                last[4] += t.nbytes
                last[5].append(name)
            else:
                spans.append([src.file, t.shard, src.start, t.offset, t.nbytes, [name]])
        for file, shard, start, offset, nbytes, names in spans:
            if stop is not None and stop.is_set():
                return
            with open(file, "rb") as fh:
                copy_range(fh.fileno(), self.fds[shard], start, offset, nbytes)
            for name in names:
                self._done(name)

    def finish(self) -> list[str]:
        if self.pending:
            raise RuntimeError(f"merge wrote no data for {len(self.pending)} tensors, "
                               f"e.g. {sorted(self.pending)[0]}")
        self.close()
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[t.shard] for t in self.by_name.values()}
            total = sum(t.nbytes for t in self.by_name.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return self.names

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _data_start(header_end: int, shard: list[OutTensor], sources: dict[str, TensorInfo]) -> int:
    """Where a shard's data begins: at `header_end` (a multiple of 8) or after up to a page of
    header padding, so that the most bytes to be copied keep their offset within a page (the
    format allows spaces after the header's JSON). Tensor offsets are relative here."""
    weight: dict[int, int] = {}
    for t in shard:
        src = sources.get(t.name)
        if src is not None and src.file is not None:
            r = (src.start - t.offset) % PAGE
            if r % 8 == 0:  # the data must still start at a multiple of 8
                weight[r] = weight.get(r, 0) + t.nbytes
    if not weight:
        return header_end
    r = max(weight, key=weight.get)
    return header_end + (r - header_end) % PAGE


def _u8():
    import torch

    return torch.uint8


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """copy_file_range in a loop; plain pread/pwrite where the kernel or Python lacks it."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(src_fd, dst_fd, count - done, src_off + done, dst_off + done)
                if n == 0:
                    raise RuntimeError("input file ended before the tensor did")
                done += n
            return
        except OSError:
            pass  # e.g. EXDEV on older kernels, or a filesystem without support: fall back
    while done < count:
        chunk = os.pread(src_fd, min(64 << 20, count - done), src_off + done)
        if not chunk:
            raise RuntimeError("input file ended before the tensor did")
        pos = 0
        while pos < len(chunk):
            pos += os.pwrite(dst_fd, chunk[pos:], dst_off + done + pos)
        done += len(chunk)


def copy_side_files(out_dir: Path, config_dir: Path | None, tokenizer_dir: Path | None,
                    dtype: str | None) -> list[str]:
    """config.json (+ generation_config.json) and the tokenizer files next to the weights;
    config.json names the output dtype when merge.dtype changed it."""
    copied = []
    for src, names in ((config_dir, CONFIG_FILES), (tokenizer_dir, TOKENIZER_FILES)):
        for name in names if src is not None else ():
            if (src / name).is_file():
                shutil.copy2(src / name, out_dir / name)
                copied.append(name)
    if dtype and (out_dir / "config.json").is_file():
        conf = json.loads((out_dir / "config.json").read_text())
        key = "torch_dtype" if "torch_dtype" in conf and "dtype" not in conf else "dtype"
        conf[key] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
        (out_dir / "config.json").write_text(json.dumps(conf, indent=2))
    return copied


def has_tokenizer(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
