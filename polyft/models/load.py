"""Base model, quantisation and tokenizer loading.

`resolve_model_path` and `check_model_dir` are light (no torch) so that the CLI can refuse
bad input before anything is written; `load_base` does the heavy work.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from polyft.errors import PolyftError
from polyft.models.gguf import ensure_converted, locate
from polyft.models.tiny import TinySpec, ensure_tiny_model

HUB_HOST = "huggingface.co"
_offline_cache: dict[str, bool] = {}


def is_offline(setting: bool | None = None) -> bool:
    """True when the hub must not be used: `offline=true`, HF_HUB_OFFLINE=1, or no route to it."""
    if setting is not None:
        return bool(setting)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    if "probe" not in _offline_cache:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=2).close()
            _offline_cache["probe"] = False
        except OSError:
            _offline_cache["probe"] = True
    return _offline_cache["probe"]


def set_offline_env() -> None:
    """Make every HF library fail fast instead of retrying a hub it cannot reach."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def looks_like_hub_id(ref: str) -> bool:
    return (not Path(ref).exists() and ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
            and not ref.endswith((".json", ".jsonl", ".safetensors")))


def hub_cached(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a hub model if the HF cache already holds it."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # any miss: not cached
        return None


def builds_tiny(model_cfg) -> bool:
    """The config builds a tiny model: a tiny preset with no model.path given on top of it."""
    return model_cfg.tiny is not None and not model_cfg.path


def resolve_model_path(model_cfg, output_root: str, offline: bool | None = None,
                       build: bool = True) -> str:
    """A local directory or a hub id for `model_cfg`. Tiny models are built and GGUF files
    converted on first use; with build=False the checks run and the directory is named."""
    if builds_tiny(model_cfg):
        spec = TinySpec(**{k: v for k, v in dict(model_cfg.tiny).items()})
        if not build:
            return str(Path(output_root) / "models" / f"{model_cfg.name}-{spec.digest()}")
        return str(ensure_tiny_model(model_cfg.name, spec, output_root).resolve())

    gguf = locate(model_cfg)
    if gguf is not None:
        return str(ensure_converted(gguf, output_root, build=build))
    ref = model_cfg.path
    if not ref:
        raise PolyftError(f"model={model_cfg.name} has no model.path; give a hub id, a local directory "
                          "or a .gguf file")
    ref = os.path.expanduser(ref)
    if Path(ref).exists():
        return str(Path(ref).resolve())
    if model_cfg.tiny is not None:  # a tiny preset: model.path replaces it, and must be local
        raise PolyftError(f"model.path={ref}: no such directory or .gguf file (model={model_cfg.name} "
                          "builds a tiny model unless model.path names a local model; any other model, "
                          f"a hub id too: model=hf model.path={ref})")
    if looks_like_hub_id(ref):
        if is_offline(offline) and hub_cached(ref, model_cfg.revision) is None:
            raise PolyftError(
                f"model.path={ref} is a hub id but polyft is offline; download it elsewhere and "
                f"set model.path=/local/dir (or run with network and offline=false)")
        return ref
    raise PolyftError(f"model.path={ref}: no such directory or file; give a local model directory, a "
                      ".gguf file or a hub id")


def model_config_json(model_cfg, output_root: str, offline: bool | None = None) -> dict | None:
    """The model's config.json (a multimodal model's text_config), without loading weights:
    from a local directory, a converted GGUF or tiny model already built, or for a hub id the
    HF cache (online: that one small file is fetched). None when it cannot be had."""
    try:
        path = resolve_model_path(model_cfg, output_root, offline, build=False)
    except PolyftError:
        return None
    f = Path(path).expanduser() / "config.json"
    if not f.is_file() and looks_like_hub_id(path):
        try:
            from huggingface_hub import hf_hub_download

            f = Path(hf_hub_download(path, "config.json", revision=model_cfg.revision,
                                     local_files_only=is_offline(offline)))
        except Exception:  # noqa: BLE001 - not cached, no route, gated: the config is unknown
            return None
    if not f.is_file():
        return None
    try:
        conf = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return conf.get("text_config", conf) if isinstance(conf, dict) else None


def model_depth(model_cfg, output_root: str, offline: bool | None = None) -> int | None:
    """The number of decoder layers: the preset's or tiny spec's, else its config.json's."""
    if builds_tiny(model_cfg):
        return model_cfg.tiny.num_layers
    if model_cfg.num_layers:
        return model_cfg.num_layers
    conf = model_config_json(model_cfg, output_root, offline) or {}
    return conf.get("num_hidden_layers")


def weight_files(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle .bin/.pt files) in a model directory."""
    p = Path(path)
    return sorted(p.glob("*.safetensors")), sorted(list(p.glob("*.bin")) + list(p.glob("*.pt")))


def check_model_dir(path: str, key: str = "model.path", allow_pickle: bool = False) -> None:
    """Refuse a local directory that is not a model, or holds pickle weights only."""
    p = Path(path)
    if not p.exists():  # a hub id, checked elsewhere
        return
    if not (p / "config.json").is_file():
        raise PolyftError(f"{key}={path} is not a model directory (no config.json)")
    safe, pickled = weight_files(p)
    if not safe and pickled and not allow_pickle:
        raise PolyftError(f"{key}={path} has only pickle weights ({pickled[0].name}); convert to "
                          "safetensors or set allow_pickle=true if you trust the file")
    if not safe and not pickled:
        raise PolyftError(f"{key}={path} holds no weights (*.safetensors)")


def safetensors_names(path: str | os.PathLike) -> list[str]:
    """Tensor names of a local model, read from the safetensors headers (no torch)."""
    names = []
    for f in weight_files(path)[0]:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        names.extend(k for k in header if k != "__metadata__")
    return names


# model.dtype and quant.compute_dtype names; auto: bf16 on a GPU, fp32 on CPU
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def torch_dtype(name: str, on_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def quantization_config(quant_cfg, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quant_cfg.bits == 4:
        # a float storage dtype lets FSDP shard the packed weights (polyft.sharding.quant_storage)
        storage = quant_cfg.get("quant_storage")
        extra = {"bnb_4bit_quant_storage": torch_dtype(storage, False)} if storage not in (None, "uint8") else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_cfg.quant_type,
                                  bnb_4bit_use_double_quant=quant_cfg.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype, **extra)
    if quant_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(path: str, model_cfg, quant_cfg=None, allow_pickle: bool = False, device_map=None,
              dtype=None, max_memory=None):
    """The base model, quantised when quant_cfg.bits is 4 or 8. model.dtype=auto: fp32 on CPU,
    bf16 on GPU; `dtype` overrides it ("auto": the checkpoint's own, as lm-eval loads it)."""
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    if dtype != "auto":
        dtype = torch_dtype(dtype or model_cfg.dtype, on_gpu)
    qconf = None
    if quant_cfg is not None:  # 4-bit compute runs in the model's dtype unless quant.compute_dtype says
        compute = quant_cfg.get("compute_dtype", "auto")
        qconf = quantization_config(quant_cfg, dtype if compute == "auto" else torch_dtype(compute, on_gpu))
    kwargs = dict(dtype=dtype, trust_remote_code=bool(model_cfg.trust_remote_code),
                  use_safetensors=None if allow_pickle else True)
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        # each process of a multi-GPU run on its own GPU (torchrun sets LOCAL_RANK)
        kwargs["device_map"] = device_map or ({"": int(os.environ.get("LOCAL_RANK", "0"))} if on_gpu else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:  # with device_map=auto: bytes per device (GPU index or "cpu")
        kwargs["max_memory"] = max_memory
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
