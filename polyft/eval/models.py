"""The models an eval scores: full model directories and PEFT adapters on a shared base.

`describe` and `identity` are light (no torch). `HFModels` loads each base once and keeps
the last one for the next run in the same process (a `-m` sweep over adapters), applies
adapters to it in place with peft (load_adapter / set_adapter, the previous adapter
deleted, `unload()` to get the plain base back), and hands lm-eval an HFLM wrapping that
model object, so no adapter evaluation reloads the base.
"""

from __future__ import annotations

import functools
import gc
import json
from dataclasses import dataclass
from pathlib import Path

from polyft import console
from polyft.adapters.flix import FlixConfig
from polyft.data.formatting import use_chat_template
from polyft.errors import PolyftError
from polyft.models.load import check_model_dir, hub_cached, load_base, looks_like_hub_id
from polyft.runs import read_manifest, resolve_base

_WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".jinja", ".txt")


@dataclass(frozen=True)
class ModelRef:
    ref: str  # as the user wrote it ("base", a path); the label in every result row
    path: str  # the model or adapter directory (or a hub id for base)
    kind: str  # model | adapter | flix (a FLix adapter: composed per task, polyft/eval/flix.py)
    base: str | None = None  # an adapter's base model (directory or hub id)

    @property
    def base_path(self) -> str:
        return self.base if self.kind in ("adapter", "flix") else self.path


def describe(ref: str, path: str, *, allow_pickle: bool = False, offline: bool = False) -> ModelRef:
    """What `path` holds, refusing anything that is not a model or an adapter."""
    key = f"eval.model={ref}"
    p = Path(path)
    if not p.exists():
        return ModelRef(ref, path, "model")  # a hub id, checked by resolve_model_path
    if (p / "adapter_config.json").is_file():
        try:
            conf = json.loads((p / "adapter_config.json").read_text())
        except json.JSONDecodeError:
            raise PolyftError(f"{key}: adapter_config.json is not valid JSON") from None
        safe, pickled = sorted(p.glob("adapter_model*.safetensors")), sorted(p.glob("adapter_model*.bin"))
        if not safe and not (pickled and allow_pickle):
            what = "only pickle weights (allow_pickle=true to load them)" if pickled else "no adapter weights"
            raise PolyftError(f"{key} is an adapter with {what} (adapter_model.safetensors)")
        base = resolve_base(p, conf.get("base_model_name_or_path"))
        if not base:
            raise PolyftError(f"{key}: adapter_config.json names no base_model_name_or_path")
        if Path(base).exists():
            check_model_dir(base, f"{key} (its base)", allow_pickle)
            base = str(Path(base).resolve())
        elif not looks_like_hub_id(base):
            raise PolyftError(f"{key}: its base model {base} does not exist; fix base_model_name_or_path "
                              "in adapter_config.json")
        elif offline and hub_cached(base) is None:
            raise PolyftError(f"{key}: its base model {base} is a hub id but polyft is offline; set "
                              "base_model_name_or_path in adapter_config.json to a local directory")
        return ModelRef(ref, str(p.resolve()), "adapter", base)
    if (p / "flix_config.json").is_file():
        base = FlixConfig.load(p, key).base_model_name_or_path
        if not base or not Path(base).exists():
            raise PolyftError(f"{key}: its base model {base} does not exist; fix base_model_name_or_path "
                              "in flix_config.json")
        return ModelRef(ref, str(p.resolve()), "flix", str(Path(base).resolve()))
    if not (p / "config.json").is_file():
        raise PolyftError(f"{key} is not a model or adapter directory (no config.json or adapter_config.json)")
    check_model_dir(str(p), key, allow_pickle)
    return ModelRef(ref, str(p.resolve()), "model")


def _dir_identity(path: str) -> dict:
    p = Path(path)
    if not p.is_dir():
        return {"hub": path}
    manifest = read_manifest(p)
    if manifest and manifest.get("hash"):  # a polyft product: its hash says what made it
        return {"path": str(p), "manifest": manifest["hash"], "kind": manifest.get("kind")}
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    return {"path": str(p), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def identity(m: ModelRef) -> dict:
    """What a cached result depends on for this model (paths plus content markers)."""
    ident = {"kind": m.kind, "model": _dir_identity(m.path)}
    if m.kind in ("adapter", "flix"):
        ident["base"] = _dir_identity(m.base)
    return ident


def tokenizer_source(m: ModelRef) -> str:
    """Where `m`'s tokenizer is read from: its own directory if it holds one, else its base."""
    return m.path if (Path(m.path) / "tokenizer_config.json").is_file() else m.base_path


def artifact_label(m: ModelRef, base_name: str) -> str:
    return base_name if m.ref == "base" else Path(m.path).name


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_batch_size(batch_size, device: str):
    """`auto` is lm-eval's search for the largest batch that fits a GPU; on CPU it means 8."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return batch_size if device.startswith("cuda") else 8
    return int(batch_size)


# The last base model loaded in this process, kept for the next run of a sweep:
# {"key": load settings, "model": the plain base, "peft": its PeftModel or None, "adapter": name}
_KEPT: dict = {}


class HFModels:
    """Models for lm-eval's HF backend; a base is loaded once and adapters go on and off it."""

    def __init__(self, model_cfg, quant_cfg=None, *, allow_pickle: bool = False, device: str | None = None,
                 batch_size=8, apply_chat_template: bool = False, parallelize: bool = False,
                 max_memory_per_gpu=None, max_cpu_memory=None):
        self.model_cfg, self.allow_pickle = model_cfg, allow_pickle
        self.quant_cfg = quant_cfg if quant_cfg is not None and quant_cfg.bits else None
        self.device = resolve_device(device)
        self.batch_size = resolve_batch_size(batch_size, self.device)
        self.apply_chat_template = apply_chat_template  # some task renders prompts as chat turns
        self.parallelize = parallelize
        self.max_memory_per_gpu, self.max_cpu_memory = max_memory_per_gpu, max_cpu_memory

    def placement(self, gpus: int | None = None) -> dict:
        """from_pretrained's device_map and max_memory. One device unless parallelize; then
        lm-eval's parallelize=True rule (HFLM._get_accelerate_args): device_map=auto over the
        `gpus` visible GPUs, each capped at max_memory_per_gpu (else what accelerate finds
        free), the CPU only when max_cpu_memory is given. Sizes are passed in bytes."""
        if not self.parallelize:
            return {"device_map": None if self.device == "cpu" else {"": self.device}}
        from polyft.merge.io import parse_size

        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if self.max_memory_per_gpu is not None:
            max_memory = dict.fromkeys(range(gpus), parse_size(self.max_memory_per_gpu))
        else:
            from accelerate.utils import get_max_memory

            max_memory = {k: v for k, v in get_max_memory().items() if k != "cpu"}
        if self.max_cpu_memory is not None:
            max_memory["cpu"] = parse_size(self.max_cpu_memory)
        # no GPU and no cap (a CPU-only host): accelerate's own choice, the host's memory
        return {"device_map": "auto", "max_memory": max_memory or None}

    def _key(self, path: str) -> str:
        quant = dict(self.quant_cfg) if self.quant_cfg is not None else None
        return json.dumps([path, self.model_cfg.dtype, self.model_cfg.revision, quant, self.device,
                           self.allow_pickle, self.parallelize, self.max_memory_per_gpu, self.max_cpu_memory,
                           self.model_cfg.get("attn_implementation")], sort_keys=True, default=str)

    def plain(self, path: str):
        """The base model at `path` with no adapter in it, loaded only if not already held."""
        if _KEPT.get("key") == self._key(path):
            if _KEPT["peft"] is not None:
                _KEPT["model"] = _KEPT["peft"].unload()  # LoRA layers out, original modules back
                _KEPT.update(peft=None, adapter=None)
            return _KEPT["model"]
        release()

        # lm-eval's dtype=auto is the checkpoint's own dtype (config.json), not polyft's
        # training rule (fp32 on CPU, bf16 on GPU); a quantised base keeps polyft's rule.
        dtype = "auto" if self.model_cfg.dtype == "auto" and self.quant_cfg is None else None
        model = load_base(path, self.model_cfg, self.quant_cfg, allow_pickle=self.allow_pickle,
                          dtype=dtype, **self.placement())
        # What fits no device is offloaded to disk by transformers, read back on every forward
        # pass (and peft cannot put an adapter on it): refused instead.
        if "disk" in (getattr(model, "hf_device_map", None) or {}).values():
            del model
            raise PolyftError(f"eval.parallelize: {path} does not fit the GPUs and CPU memory allowed "
                              f"(eval.max_memory_per_gpu={self.max_memory_per_gpu}, eval.max_cpu_memory="
                              f"{self.max_cpu_memory}); raise them or use more GPUs")
        model.eval()
        _KEPT.update(key=self._key(path), model=model, peft=None, adapter=None, count=0)
        return model

    def with_adapter(self, m: ModelRef):
        """The base of `m` with only adapter `m` active (the previous adapter deleted)."""
        if _KEPT.get("key") != self._key(m.base) or _KEPT["peft"] is None:
            from peft import PeftModel

            base = self.plain(m.base)
            _KEPT["count"] += 1
            name = f"a{_KEPT['count']}"
            _KEPT.update(peft=PeftModel.from_pretrained(base, m.path, adapter_name=name), adapter=name)
        else:
            peft_model, old = _KEPT["peft"], _KEPT["adapter"]
            _KEPT["count"] += 1
            name = f"a{_KEPT['count']}"
            peft_model.load_adapter(m.path, adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.delete_adapter(old)
            _KEPT["adapter"] = name
        _KEPT["peft"].eval()
        return _KEPT["peft"]

    def tokenizer_for(self, m: ModelRef):
        """The tokenizer as lm-eval's HFLM loads it (fast, no pad token invented here: HFLM
        picks one as it does for a path), with model.chat_template's template if asked for."""
        from transformers import AutoTokenizer

        source = tokenizer_source(m)
        revision = None if Path(source).is_dir() else self.model_cfg.revision  # a hub base's pin
        tok = AutoTokenizer.from_pretrained(source, revision=revision, use_fast=True,
                                            trust_remote_code=bool(self.model_cfg.trust_remote_code))
        if self.apply_chat_template:
            use_chat_template(tok, self.model_cfg.get("chat_template", "model"), source)
        return tok

    def lm(self, m: ModelRef):
        """An lm-eval HFLM around the shared model object, with `m`'s adapter (if any) on."""
        model = self.plain(m.path) if m.kind == "model" else self.with_adapter(m)
        return progress_lm()(pretrained=model, tokenizer=self.tokenizer_for(m), batch_size=self.batch_size)


@functools.lru_cache(maxsize=1)
def progress_lm():
    """HFLM drawing polyft's one bar over each batch of requests (lm-eval's own bars off):
    counted per forward pass, it is the same computation HFLM does."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        bar = None

        def _requests(self, method, requests, what):
            self.bar = console.progress(len(requests), f"eval: {what}", unit="request")
            try:
                out = getattr(super(), method)(requests, disable_tqdm=True)
                self._advance(len(requests))  # requests sharing a context were scored in one pass
                return out
            finally:
                self.bar.close()
                self.bar = None

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._requests("loglikelihood", requests, "loglikelihood")

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return self._requests("loglikelihood_rolling", requests, "rolling loglikelihood")

        def generate_until(self, requests, disable_tqdm=False):
            return self._requests("generate_until", requests, "generation")

        def _advance(self, n: int) -> None:
            if self.bar is not None:
                self.bar.update(min(n, self.bar.total - self.bar.n))

        def _model_call(self, inps, attn_mask=None, labels=None):
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            self._advance(inps.shape[0])
            return out

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            self._advance(context.shape[0])
            return out

    return ProgressLM


def release() -> None:
    """Drop the kept model (another base is next)."""
    if not _KEPT:
        return  # a full gc pass over a freshly imported torch stack costs ~0.4 s
    _KEPT.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def order_by_base(models: list[ModelRef]) -> list[ModelRef]:
    """Models grouped by base (first appearance order), plain models before adapters, so a
    base is loaded once however the user ordered them."""
    groups: dict[str, list[ModelRef]] = {}
    for m in models:
        groups.setdefault(str(Path(m.base_path).resolve()) if Path(m.base_path).exists() else m.base_path,
                          []).append(m)
    return [m for group in groups.values() for m in sorted(group, key=lambda x: x.kind == "adapter")]

