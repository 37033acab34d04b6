"""`merge_models`: run a registered method over checkpoints, one tensor at a time.

The library entry point: plain paths and a small dataclass in, a directory of safetensors
shards (plus config and tokenizer files) out. No Hydra here.

Work is split over three threads so that two cores stay busy: a reader maps the next
tensor of every input and converts it to fp32, the calling thread runs the method, and a
writer casts the result to the output dtype and writes it at its planned offset. At most
one tensor is in each stage, so peak memory is a few times (largest tensor x inputs).
Tensors that a method takes unchanged from one input (layer swapping) are copied file to
file by a fourth thread, which starts before torch is even imported.
"""

from __future__ import annotations

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
    tokenizer_source: Path | None = None  # default: models[0]
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
        elif p in registry.GRADIENT_PARAMS:
            kwargs[p] = float(resolve_scalar(params[p], layer, n_layers))
        elif p != "mix":
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
                rows_only = len(a.shape) == 2 and a.shape[1:] == b.shape[1:]
                if not rows_only:
                    raise PolyftError(f"tensor {name} has shape {list(a.shape)} in {ref_label} but "
                                      f"{list(b.shape)} in {label}; models of different shapes cannot be merged")
                if vocab != "first":
                    raise PolyftError(f"tensor {name} has {a.shape[0]} rows in {ref_label} but {b.shape[0]} in "
                                      f"{label}: the vocabularies differ; {VOCAB_HINT}")
            if a.dtype != b.dtype:
                raise PolyftError(f"tensor {name} is {a.dtype} in {ref_label} but {b.dtype} in {label}; "
                                  "convert the models to one dtype first")
    return list(ref.tensors)


def plan_jobs(spec: MergeSpec, method: registry.Method, inputs: list[io.Checkpoint],
              names: list[str]) -> tuple[list[Job], int]:
    ref = inputs[0]
    n_layers = count_layers(names)
    wanted = io.DTYPE_NAMES[spec.dtype] if spec.dtype else None
    route_params = {k: spec.params[k] for k in ("bottom", "top", "transition_bottom", "transition_top",
                                                  "blend", "non_layer") if k in spec.params}
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


def merge_models(spec: MergeSpec, out_dir: str | Path) -> dict:
    """Merge `spec.models` into `out_dir` (which must exist and be empty: the caller makes it
    temporary and renames it when this returns). Returns diagnostics for the manifest."""
    start = time.time()
    out_dir = Path(out_dir)
    method = registry.get(spec.method)
    inputs, base = open_inputs(spec)
    labels = spec.labels or [str(p) for p in spec.models]
    checkpoints = list(zip(labels, inputs)) + ([(str(spec.base), base)] if base is not None else [])
    names = compare_layouts(checkpoints, spec.vocab)
    jobs, n_layers = plan_jobs(spec, method, inputs, names)
    writer = io.ShardWriter(out_dir, [j.out for j in jobs], spec.shard_size)
    stop = threading.Event()

    def copy_all(raw_jobs):
        for j in raw_jobs:
            if stop.is_set():
                return
            writer.copy(j.name, j.raw)

    stats: dict = {}
    raw_jobs = [j for j in jobs if j.raw is not None]
    compute_jobs = [j for j in jobs if j.raw is None]
    try:
        with ThreadPoolExecutor(1, "polyft-copy") as copier:
            copied = copier.submit(copy_all, raw_jobs)
            if compute_jobs:
                _compute(spec, method, inputs, base, compute_jobs, n_layers, writer, stats)
            copied.result()
    finally:
        stop.set()
    shards = writer.finish()
    config_dir = _side_dirs(spec.config_source or spec.models[0], inputs, spec)[0]
    tokenizer_dir = _side_dirs(spec.tokenizer_source or spec.models[0], inputs, spec)[1]
    side = io.copy_side_files(out_dir, config_dir, tokenizer_dir,
                              io.DTYPE_NAMES[spec.dtype] if spec.dtype else None)
    result = {"method": spec.method, "tensors": len(jobs), "copied_tensors": len(raw_jobs),
              "layers": n_layers, "shards": shards, "files": side,
              "bytes": sum(j.out.nbytes for j in jobs), "seconds": round(time.time() - start, 3)}
    if method.summary is not None:
        result["diagnostics"] = method.summary(stats)
    return result


def _compute(spec, method, inputs, base, jobs, n_layers, writer, stats) -> None:
    """The read -> compute -> write pipeline over the jobs that are not plain copies."""
    import torch

    ref = inputs[0]

    def fit_rows(t, name):
        """vocab=first: the first model's number of rows (its rows fill a shorter tensor)."""
        rows = ref.tensors[name].shape[0]
        if t.shape[0] == rows:
            return t
        if t.shape[0] > rows:
            return t[:rows]
        return torch.cat([t, ref.load(name)[t.shape[0]:].float()])

    def read(i, name):
        t = inputs[i].load(name)
        return fit_rows(t.float(), name) if t.is_floating_point() else t

    def load(job):
        if job.take is not None:
            return [read(job.take, job.name)], None
        tensors = [read(i, job.name) if job.mix is None or job.mix[i] != 0 else None
                   for i in range(len(inputs))]
        base_t = None
        if method.needs_base:
            base_t = base.load(job.name).float()
            base_t = fit_rows(base_t, job.name)
        return tensors, base_t

    def compute(job, tensors, base_t):
        if job.take is not None:
            return tensors[0]
        kwargs = method_kwargs(method, spec.params, len(inputs), job.name, job.layer, n_layers, stats)
        if "mix" in method.params:
            kwargs["mix"] = job.mix
        return method.fn(tensors, base_t, **kwargs)

    def write(job, out):
        writer.write(job.name, out.to(io.torch_dtype(job.out.dtype)))

    with ThreadPoolExecutor(1, "polyft-read") as reader, ThreadPoolExecutor(1, "polyft-write") as wr:
        nxt = reader.submit(load, jobs[0])
        pending = None
        for k, job in enumerate(jobs):
            tensors, base_t = nxt.result()
            if k + 1 < len(jobs):
                nxt = reader.submit(load, jobs[k + 1])
            out = compute(job, tensors, base_t)
            del tensors, base_t
            if pending is not None:
                pending.result()  # one tensor in the writer at a time bounds memory
            pending = wr.submit(write, job, out)
            del out
        if pending is not None:
            pending.result()


def _side_dirs(source: Path, inputs, spec) -> tuple[Path, Path]:
    """(config dir, tokenizer dir) of a source: an adapter gives its base's config.json and its
    own tokenizer if it saved one, else its base's."""
    source = Path(source)
    if not io.is_adapter_dir(source):
        return source, source
    base = spec.adapter_bases.get(str(source)) or io.adapter_base_ref(source)
    return Path(base), source if io.has_tokenizer(source) else Path(base)
