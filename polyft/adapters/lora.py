"""PEFT LoRA directories: read, write, copy a tokenizer beside them.

Adapter-space merges (lorahub, flix_compose) and FLix's composition write their products in
this one format, which `peft.PeftModel.from_pretrained` (and vLLM) load.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from polyft.errors import PolyftError
from polyft.merge.io import TOKENIZER_FILES, has_tokenizer
from polyft.runs import resolve_base

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


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
    if conf.get("base_model_name_or_path"):  # relative to the adapter, wherever polyft runs
        conf["base_model_name_or_path"] = resolve_base(p, conf["base_model_name_or_path"])
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
    for src in sources:
        if src and Path(src).is_dir() and has_tokenizer(Path(src)):
            for name in TOKENIZER_FILES:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, out_dir / name)
            return
