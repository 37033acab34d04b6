"""Adapter-space merges: methods whose product is a PEFT LoRA adapter, not a full model.

A full-model merge (engine.py) streams the tensors of whole checkpoints. An adapter-space
merge reads LoRA factors (A, B per module) and writes new ones, so its product stays
small and is served like any LoRA (peft, vLLM). Methods of this kind:

    flix_compose   one FLix adapter -> the LoRA of one feature set (polyft.merge.flix_compose)
    lorahub        several LoRAs -> sum w_i A_i, sum w_i B_i, w searched (polyft.merge.lorahub)

A method module defines
    check(cfg, resolve) -> None        refuse bad input (one line), reads headers only
    product_key(cfg, resolve) -> dict  what determines the product (params + input identity)
    build(cfg, out_dir, resolve) -> dict  write adapter_config.json + adapter_model.safetensors
                                       into out_dir; return {"manifest": {...}, "metrics": {...}}
where resolve(cfg, ref) -> Path is polyft.commands.merge.resolve_ref (base, expert, merge or
path), passed in so that the methods sit below the command that dispatches to them.
and this module does the rest: the artifact store (lock, reuse, atomic rename), run.json.
LoRA files are read and written here, so every method shares one format.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from polyft import console
from polyft.errors import PolyftError

# method name -> module defining check / product_key / build
METHODS = {"flix_compose": "polyft.merge.flix_compose", "lorahub": "polyft.merge.lorahub"}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def names() -> list[str]:
    return sorted(METHODS)


def is_adapter_method(name: str) -> bool:
    return name in METHODS


def method_module(name: str):
    return importlib.import_module(METHODS[name])


@dataclass
class LoraAdapter:
    """A PEFT LoRA directory in memory: its config and its factors per module."""

    path: Path
    config: dict
    tensors: dict  # safetensors names -> torch tensors, as saved by peft

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def factors(self) -> dict[str, tuple]:
        """module prefix -> (A [r, in], B [out, r])."""
        out = {}
        for name, a in self.tensors.items():
            if ".lora_A." in name:
                prefix = name.split(".lora_A.")[0]
                out[prefix] = (a, self.tensors[name.replace(".lora_A.", ".lora_B.")])
        return out


def read_lora_config(path: str | os.PathLike, key: str) -> dict:
    """adapter_config.json of a plain LoRA with safetensors weights, or one line naming `key`."""
    p = Path(path)
    conf_file = p / CONFIG_FILE
    if not conf_file.is_file():
        raise PolyftError(f"{key}={p}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        conf = json.loads(conf_file.read_text())
    except json.JSONDecodeError:
        raise PolyftError(f"{key}={p}: {CONFIG_FILE} is not valid JSON") from None
    if conf.get("peft_type", "LORA") != "LORA" or conf.get("use_dora"):
        raise PolyftError(f"{key}={p}: a {conf.get('peft_type')} adapter{' with DoRA' if conf.get('use_dora') else ''}; "
                          "only plain LoRA adapters are allowed here")
    if not (p / WEIGHTS_FILE).is_file():
        raise PolyftError(f"{key}={p}: no {WEIGHTS_FILE} (safetensors weights) in the adapter directory")
    return conf


def read_lora(path: str | os.PathLike, key: str = "adapter") -> LoraAdapter:
    from safetensors.torch import load_file

    conf = read_lora_config(path, key)
    return LoraAdapter(Path(path), conf, load_file(str(Path(path) / WEIGHTS_FILE)))


def write_lora(out_dir: str | os.PathLike, config: dict, tensors: dict) -> None:
    """A directory `peft.PeftModel.from_pretrained` loads: config plus safetensors weights."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})


def copy_tokenizer(out_dir: Path, *sources: str | os.PathLike | None) -> None:
    """The first source's tokenizer files (an adapter dir, then its base), so evals find them."""
    import shutil

    from polyft.merge.io import TOKENIZER_FILES, has_tokenizer

    for src in sources:
        if src and Path(src).is_dir() and has_tokenizer(Path(src)):
            for name in TOKENIZER_FILES:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, out_dir / name)
            return


def check(cfg, resolve) -> None:
    method_module(cfg.merge.method).check(cfg, resolve)


def command(cfg, record, kind: str, resolve) -> None:
    """Find the product in the store or build it; record it in run.json."""
    from polyft.runs import ArtifactStore, config_hash, read_manifest

    module = method_module(cfg.merge.method)
    module.check(cfg, resolve)
    name = cfg.merge.name or cfg.merge.method
    key = module.product_key(cfg, resolve)
    store = ArtifactStore(Path(cfg.output_root) / "artifacts")
    target = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    record.extra["product"] = {"kind": kind, "name": name, "hash": config_hash(key)}
    with store.lock(kind, name, key):
        if target is not None:
            m = read_manifest(target)
            found = target if m and m.get("hash") == config_hash(key) else None
        else:
            found = store.find(kind, name, key)
        if found is not None:
            record.add_artifact(kind, found, reused=True)
            console.echo(f"polyft: merge {name} already built: {found}")
            return
        since = console.started(f"merging {name} ({cfg.merge.method})")
        with store.build(kind, name, key, target=target) as build:
            result = module.build(cfg, build.dir, resolve)
            build.manifest.update(method=cfg.merge.method, product="adapter", **result.get("manifest", {}))
    record.metrics.update(result.get("metrics", {}))
    record.add_artifact(kind, build.dir, reused=False)
    console.done(since, f"merge {name} written to {build.dir}")
