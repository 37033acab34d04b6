"""Merge methods by name: one registry for both kinds of product.

A model method is one small function over fp32 tensors of a single parameter, registered
with `@register`. The engine (engine.py) reads the inputs, resolves per-layer parameters,
calls the function and writes its result; the function never sees files or configs.

An adapter method (lorahub, flix_compose) writes a PEFT LoRA instead of a checkpoint; its
module registers, with `register_adapter`, `check(cfg, refs)` (files, one line),
`product_key(cfg, refs)` (what determines the product) and `build(cfg, out_dir, refs)`
(writes the LoRA, returns {"manifest": ..., "metrics": ...}). `refs` is what the command
layer lends them to turn names into directories and data (polyft.products.Refs).

Every method may register `rules(merge_config)`: its parameters' rules, pure, beside its
maths; polyft.config.rules calls them.

Calling convention: `fn(tensors, base, **params)` where `tensors` are the models' tensors
in config order, `base` is the base model's tensor (None unless `needs_base`), and the
keyword arguments are the `params` the method declared, already resolved to plain values
for this tensor (`name`: the tensor's name, `stats`: a dict the method may add counts to).
A function returns the merged tensor and must not modify its inputs, which can be
memory-mapped views of the checkpoint files.

The engine calls a function on row blocks of a tensor (2-D views: rows x the rest), so
that memory stays at a few blocks and the arithmetic runs in cache. A method whose result
at an entry depends on the whole tensor (TIES' top-k, SLERP's angle) registers `prepare`:
`prepare(chunks, numel=..., **params)` streams the blocks (`chunks()` yields
(tensors, base) per block, every time it is called) and returns extra keyword arguments
for the per-block calls. Called on whole tensors, each function computes them itself.

Method modules import torch inside their functions, so listing the registered names (the
CLI's config checks) does not import torch.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from polyft.errors import ConfigError

# The modules holding the methods; importing them registers what they define.
MODULES = ("linear", "task_arithmetic", "ties", "ties_sv", "dare", "slerp", "layer_swap", "lorahub",
           "flix_compose")
# Parameters that may be lists of anchors spread over layer depth (see engine.resolve_scalar).
GRADIENT_PARAMS = ("weights", "scale", "density", "t")

_METHODS: dict[str, "Method"] = {}
_loaded = False


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable | None = None  # model methods: the per-tensor function
    params: tuple[str, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    # Optional: (layer, n_layers, **merge params) -> per-model mixing weights. A one-hot
    # answer means "this model's tensor, unchanged", which the engine copies byte for byte.
    route: Callable | None = None
    # Optional: (summed stats) -> diagnostics for the manifest and run.json.
    summary: Callable | None = None
    # Optional: whole-tensor quantities for the per-block calls (see the module doc).
    prepare: Callable | None = None
    # Optional: (merge config) -> None, raising ConfigError for a bad parameter value.
    rules: Callable | None = None
    product: str = "model"  # model | adapter
    # adapter methods (see the module doc)
    check: Callable | None = None
    product_key: Callable | None = None
    build: Callable | None = None

    def config_keys(self) -> tuple[str, ...]:
        """The merge.* keys this method reads (the function's and the route's)."""
        keys = [p for p in self.params if p not in ("name", "stats", "mix", "row0")]
        if self.route is not None:
            keys += [p.name for p in inspect.signature(self.route).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY]
        return tuple(keys)


def _add(method: Method) -> None:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method


def register(name: str, *, params: tuple[str, ...] = (), needs_base: bool = False,
             min_models: int = 1, max_models: int | None = None, route: Callable | None = None,
             summary: Callable | None = None, prepare: Callable | None = None,
             rules: Callable | None = None) -> Callable:
    def decorate(fn: Callable) -> Callable:
        _add(Method(name, fn, tuple(params), needs_base, min_models, max_models, route, summary, prepare, rules))
        return fn

    return decorate


def register_adapter(name: str, *, check: Callable, product_key: Callable, build: Callable,
                     rules: Callable | None = None) -> None:
    _add(Method(name, rules=rules, product="adapter", check=check, product_key=product_key, build=build))


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in MODULES:
            importlib.import_module(f"polyft.merge.{module}")
        _loaded = True


def names() -> list[str]:
    _load()
    return sorted(_METHODS)


def is_adapter_method(name: str) -> bool:
    return get(name).product == "adapter"


def get(name: str) -> Method:
    _load()
    if name not in _METHODS:
        raise ConfigError(f"merge.method={name}: unknown merge method; registered: {', '.join(names())}")
    return _METHODS[name]
