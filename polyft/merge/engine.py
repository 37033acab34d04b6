"""`merge_models`: run a registered method over checkpoints, one tensor at a time.

The library entry point: plain paths and a small dataclass in, a directory of safetensors
shards (plus config and tokenizer files) out. No Hydra here.

Each tensor is memory-mapped from every input and processed in blocks of rows: converted
to fp32, merged, cast to the output dtype and written at its planned offset. A pool of
worker threads, one per core, takes one tensor each (torch releases the GIL in its
kernels). Memory is then a few blocks per worker plus the mapped pages of the tensors in
work (largest tensor x inputs), and the blocks stay in the CPU caches. Tensors that a
method takes unchanged from one input (layer swapping) are copied file to file by another
thread, which starts before torch is even imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from polyft.errors import PolyftError
from polyft.merge import io, registry

# The layer index of a tensor name: model.layers.7.mlp..., transformer.h.7..., blocks.7...
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# Entries per block of rows that a method sees at a time: a few such blocks of every input
# fit in the CPU caches, and memory stays flat whatever the tensor sizes.
BLOCK_ENTRIES = 1 << 18
# Tensors computed at the same time, one per core (the machine this was tuned on has two).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = max(1, min(CORES, 8))
VOCAB_HINT = ("set merge.vocab=first to keep the first model's vocabulary (rows a model lacks "
              "are taken from the first model, extra rows are dropped)")


@dataclass
class MergeSpec:
    method: str
    models: list[Path]  # in the method's order; layer_swap: [middle, outer]
    base: Path | None = None
    params: dict = field(default_factory=dict)  # merge.* values the method reads
    dtype: str | None = None  # float32 | bfloat16 | float16; None: the inputs' dtype
    shard_size: int = 2_000_000_000
    config_source: Path | None = None  # default: models[0]
    tokenizer_source: Path | None = None  # default: the first model (then base) that has one
    vocab: str = "strict"  # strict | first
    adapter_bases: dict = field(default_factory=dict)  # adapter dir -> its base model dir
    allow_pickle: bool = False
    labels: list[str] | None = None  # how messages name the models (default: their paths)


@dataclass
class Job:
    name: str
    layer: int | None
    out: io.OutTensor
    take: int | None = None  # the output is this input's tensor, unchanged
    mix: tuple | None = None  # route result (layer_swap): per-input weights
    raw: io.TensorInfo | None = None  # `take` whose bytes can be copied file to file


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def count_layers(names) -> int:
    layers = [layer_of(n) for n in names]
    return max((x for x in layers if x is not None), default=-1) + 1


def resolve_scalar(value, layer: int | None, n_layers: int):
    """A parameter for one tensor. A list is a gradient: its anchors are spread evenly from
    the first layer to the last and interpolated linearly; a tensor outside the layers
    (embeddings, final norm, lm_head) takes the mean of the anchors."""
    if not isinstance(value, (list, tuple)):
        return value
    anchors = [float(v) for v in value]
    if len(anchors) == 1:
        return anchors[0]
    if layer is None or n_layers < 1:
        return sum(anchors) / len(anchors)
    x = layer / max(n_layers - 1, 1) * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    return anchors[i] * (1 - f) + anchors[i + 1] * f


def method_kwargs(method: registry.Method, params: dict, n_models: int, name: str,
                  layer: int | None, n_layers: int, stats: dict) -> dict:
    kwargs = {}
    for p in method.params:
        if p == "name":
            kwargs[p] = name
        elif p == "stats":
            kwargs[p] = stats
        elif p == "weights":
            weights = params.get("weights") or [1.0] * n_models
            kwargs[p] = [float(resolve_scalar(w, layer, n_layers)) for w in weights]
        elif p not in params or p == "mix":
            continue  # the function's own default
        elif p in registry.GRADIENT_PARAMS:
            kwargs[p] = float(resolve_scalar(params[p], layer, n_layers))
        else:
            kwargs[p] = params[p]
    return kwargs


def open_inputs(spec: MergeSpec) -> tuple[list[io.Checkpoint], io.Checkpoint | None]:
    def open_one(p):
        return io.open_checkpoint(p, spec.adapter_bases.get(str(p)), spec.allow_pickle)

    return [open_one(p) for p in spec.models], (open_one(spec.base) if spec.base else None)


def compare_layouts(checkpoints: list[tuple[str, io.Checkpoint]], vocab: str = "strict") -> list[str]:
    """The tensor names of the first checkpoint, after checking that all checkpoints have the
    same architecture, tensor names, shapes and dtypes. Raises PolyftError naming the tensor."""
    (ref_label, ref), others = checkpoints[0], checkpoints[1:]
    ref_type = ref.config.get("model_type")
    for label, ck in others:
        kind = ck.config.get("model_type")
        if ref_type and kind and kind != ref_type:
            raise PolyftError(f"models differ in architecture: {ref_label} is a {ref_type} model but "
                              f"{label} is a {kind} model (config.json model_type)")
        missing = [n for n in ref.tensors if n not in ck.tensors]
        extra = [n for n in ck.tensors if n not in ref.tensors]
        if missing or extra:
            name, where, lacks = (missing[0], ref_label, label) if missing else (extra[0], label, ref_label)
            raise PolyftError(f"models differ in tensors: {name} is in {where} but not in {lacks} "
                              f"({len(missing) + len(extra)} tensor names differ)")
        for name, a in ref.tensors.items():
            b = ck.tensors[name]
            if a.shape != b.shape:
                if not _is_vocab_difference(name, a.shape, b.shape, ref.config, ck.config):
                    raise PolyftError(f"tensor {name} has shape {list(a.shape)} in {ref_label} but "
                                      f"{list(b.shape)} in {label}; models of different shapes cannot "
                                      "be merged")
                if vocab != "first":
                    raise PolyftError(f"tensor {name} has {a.shape[0]} rows in {ref_label} but "
                                      f"{b.shape[0]} in {label}: the vocabularies differ; {VOCAB_HINT}")
            if a.dtype != b.dtype:
                raise PolyftError(f"tensor {name} is {a.dtype} in {ref_label} but {b.dtype} in {label}; "
                                  "convert the models to one dtype first")
    return list(ref.tensors)


def _is_vocab_difference(name: str, a: tuple, b: tuple, conf_a: dict, conf_b: dict) -> bool:
    """Shapes that differ only in their rows, where the rows are the models' vocabularies
    (config vocab_size; without one, a tensor named like an embedding or lm_head)."""
    if len(a) != 2 or a[1:] != b[1:]:
        return False
    va, vb = conf_a.get("vocab_size"), conf_b.get("vocab_size")
    if va and vb:
        return a[0] == va and b[0] == vb
    return any(w in name for w in ("embed", "lm_head", "wte", "output"))


def plan_jobs(spec: MergeSpec, method: registry.Method, inputs: list[io.Checkpoint],
              names: list[str]) -> tuple[list[Job], int]:
    ref = inputs[0]
    n_layers = count_layers(names)
    wanted = io.DTYPE_NAMES[spec.dtype] if spec.dtype else None
    route_params = {k: spec.params[k] for k in method.config_keys()
                    if k not in method.params and k in spec.params}
    jobs = []
    for name in names:
        info = ref.tensors[name]
        dtype = wanted if wanted and info.dtype in io.FLOAT_CODES else info.dtype
        nbytes = io.DTYPE_SIZES[dtype]
        for d in info.shape:
            nbytes *= d
        job = Job(name, layer_of(name), io.OutTensor(name, dtype, info.shape, nbytes))
        if info.dtype not in io.FLOAT_CODES:
            job.take = 0  # integer buffers are not merged: the first model's, as they are
        elif method.route is not None:
            job.mix = tuple(float(w) for w in method.route(job.layer, n_layers, **route_params))
            used = [i for i, w in enumerate(job.mix) if w != 0]
            if len(used) == 1 and job.mix[used[0]] == 1.0:
                job.take = used[0]
        if job.take is not None:
            src = inputs[job.take]
            raw = src.raw(name)
            if raw is not None and raw.dtype == dtype and src.tensors[name].shape == info.shape:
                job.raw = raw
        jobs.append(job)
    return jobs, n_layers


@contextlib.contextmanager
def reusable_heap():
    """Keep freed tensor memory in the process for the next tensor (glibc only).

    Every tensor of a merge is a fresh allocation of tens to hundreds of MB; by default glibc
    maps each from the kernel and unmaps it when freed, so every page is faulted in and
    zeroed again, which costs more than the arithmetic (a bf16 -> fp32 conversion runs 10x
    slower). One arena without mmap thresholds lets the next tensor reuse the last one's
    memory; on exit the defaults are restored and the heap is trimmed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    mallopt(M_ARENA_MAX, 1)
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield
    finally:
        mallopt(M_ARENA_MAX, 0)  # 0: glibc's own choice again
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        trim(0)


def merge_models(spec: MergeSpec, out_dir: str | Path, progress=None) -> dict:
    """Merge `spec.models` into `out_dir` (which must exist and be empty: the caller makes it
    temporary and renames it when this returns). Returns diagnostics for the manifest.
    `progress(total)`, if given, makes a bar (update(n), close()) over the output tensors."""
    start = time.time()
    out_dir = Path(out_dir)
    method = registry.get(spec.method)
    inputs, base = open_inputs(spec)
    labels = spec.labels or [str(p) for p in spec.models]
    checkpoints = list(zip(labels, inputs)) + ([(str(spec.base), base)] if base is not None else [])
    names = compare_layouts(checkpoints, spec.vocab)
    jobs, n_layers = plan_jobs(spec, method, inputs, names)
    bar = progress(len(jobs)) if progress is not None else None
    writer = io.ShardWriter(out_dir, [j.out for j in jobs], spec.shard_size,
                            on_done=(lambda name: bar.update(1)) if bar is not None else None,
                            sources={j.name: j.raw for j in jobs if j.raw is not None})
    stop = threading.Event()

    def copy_all(raw_jobs):
        writer.copy_many([(j.name, j.raw) for j in raw_jobs], stop)

    stats: dict = {}
    raw_jobs = [j for j in jobs if j.raw is not None]
    compute_jobs = [j for j in jobs if j.raw is None]
    # A merge that only copies (a layer swap without blending) copies on every core: the
    # kernel's page-cache copies then run side by side. Otherwise one copier beside the maths.
    lanes = copy_lanes(raw_jobs, 1 if compute_jobs else (os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(len(lanes) or 1, "polyft-copy") as copier:
            copied = [copier.submit(copy_all, lane) for lane in lanes]
            try:
                if compute_jobs:
                    with reusable_heap():
                        _compute(spec, method, inputs, base, compute_jobs, n_layers, writer, stats)
            except BaseException:
                stop.set()  # do not finish copying for a merge that failed
                raise
            for c in copied:
                c.result()
        shards = writer.finish()
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    config_dir = _side_dirs(spec.config_source or spec.models[0], inputs, spec)[0]
    tokenizer_dir = _side_dirs(spec.tokenizer_source or _first_with_tokenizer(spec), inputs, spec)[1]
    side = io.copy_side_files(out_dir, config_dir, tokenizer_dir,
                              io.DTYPE_NAMES[spec.dtype] if spec.dtype else None)
    result = {"method": spec.method, "tensors": len(jobs), "copied_tensors": len(raw_jobs),
              "layers": n_layers, "shards": shards, "files": side,
              "bytes": sum(j.out.nbytes for j in jobs), "seconds": round(time.time() - start, 3)}
    if method.summary is not None:
        result["diagnostics"] = method.summary(stats)
    return result


def copy_lanes(raw_jobs: list[Job], n: int) -> list[list[Job]]:
    """The copies grouped by output shard (in file order), the shards dealt to at most n lanes
    by bytes. A lane per file, not per stretch of one file: the filesystem serialises writes
    to one file (measured on ext4: two copiers into one file are slower than one)."""
    shards: dict[int, list[Job]] = {}
    for j in sorted(raw_jobs, key=lambda j: (j.out.shard, j.out.offset)):
        shards.setdefault(j.out.shard, []).append(j)
    lanes = [[] for _ in range(max(1, min(n, len(shards))))]
    load = [0] * len(lanes)
    for shard in sorted(shards.values(), key=lambda js: -sum(j.out.nbytes for j in js)):
        k = load.index(min(load))
        lanes[k] += shard
        load[k] += sum(j.out.nbytes for j in shard)
    return [lane for lane in lanes if lane]


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges of about BLOCK_ENTRIES entries (whole rows, a multiple of 64 when >= 64)."""
    step = max(1, BLOCK_ENTRIES // max(cols, 1))
    if step >= 64:
        step -= step % 64
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _as_rows(t):
    """A tensor seen as rows x the rest (a view)."""
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def _compute(spec, method, inputs, base, jobs, n_layers, writer, stats) -> None:
    """Compute and write the jobs that are not file copies: one tensor per worker thread,
    block by block (read from the mapped files, convert to fp32, run the method, cast,
    write). Torch releases the GIL inside its kernels, so the workers use the cores."""
    import torch

    ref = inputs[0]
    lock = threading.Lock()
    failed = threading.Event()

    def fit_rows(t, name):
        """vocab=first: the first model's number of rows (its rows fill a shorter tensor)."""
        rows = ref.tensors[name].shape[0]
        if t.shape[0] > rows:
            return t[:rows]
        if t.shape[0] < rows:
            return torch.cat([t, ref.load(name)[t.shape[0]:].to(t.dtype)])
        return t

    def open_job(job):
        """The job's input tensors as memory-mapped rows x rest views (None: not read)."""
        used = [job.take] if job.take is not None else \
            [i for i in range(len(inputs)) if job.mix is None or job.mix[i] != 0]
        views = [_as_rows(fit_rows(inputs[i].load(job.name), job.name)) if i in used else None
                 for i in range(len(inputs))]
        base_view = None
        if method.needs_base and job.take is None:
            base_view = _as_rows(fit_rows(base.load(job.name), job.name))
        return views, base_view

    def blocks(views, base_view, convert=True):
        ref_view = next(v for v in views if v is not None)
        for r0, r1 in row_blocks(*ref_view.shape):
            xs = [None if v is None else (v[r0:r1].float() if convert else v[r0:r1]) for v in views]
            yield r0, xs, None if base_view is None else base_view[r0:r1].float()

    def start(job, views, base_view, job_stats) -> dict:
        """The method's keyword arguments for one tensor, whole-tensor quantities included."""
        kwargs = method_kwargs(method, spec.params, len(inputs), job.name, job.layer, n_layers, job_stats)
        if "mix" in method.params:
            kwargs["mix"] = job.mix
        if method.prepare is not None:
            def chunks():
                return ((xs, bx) for _, xs, bx in blocks(views, base_view))

            kwargs.update(method.prepare(chunks, numel=math.prod(job.out.shape), **kwargs))
        return kwargs

    def run(job) -> None:
        if failed.is_set():
            return
        views, base_view = open_job(job)
        job_stats: dict = {}
        kwargs = start(job, views, base_view, job_stats) if job.take is None else {}
        dtype = io.torch_dtype(job.out.dtype)
        row_bytes = job.out.nbytes // max(job.out.shape[0], 1) if job.out.shape else job.out.nbytes
        for r0, xs, bx in blocks(views, base_view, convert=job.take is None):
            if job.take is not None:
                out = xs[job.take]
            else:
                if "row0" in method.params:
                    kwargs["row0"] = r0
                out = method.fn(xs, bx, **kwargs)
            writer.write(job.name, out.to(dtype), r0 * row_bytes)
        with lock:
            for k, v in job_stats.items():
                stats[k] = stats.get(k, 0) + v

    # The workers already keep the cores busy; torch's own pool on top would spin-wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(WORKERS, "polyft-merge") as pool:
            futures = [pool.submit(run, job) for job in jobs]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                failed.set()
                for f in futures:
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


def _side_dirs(source: Path, inputs, spec) -> tuple[Path, Path]:
    """(config dir, tokenizer dir) of a source: an adapter gives its base's config.json and its
    own tokenizer if it saved one, else its base's."""
    source = Path(source)
    if not io.is_adapter_dir(source):
        return source, source
    base = spec.adapter_bases.get(str(source)) or io.adapter_base_ref(source)
    return Path(base), source if io.has_tokenizer(source) else Path(base)


def _first_with_tokenizer(spec) -> Path:
    candidates = list(spec.models) + ([spec.base] if spec.base else [])
    for c in candidates:
        if io.has_tokenizer(_side_dirs(c, None, spec)[1]):
            return c
    return spec.models[0]
