"""flix_compose: one feature set of a FLix adapter as one standard PEFT LoRA.

    polyft merge merge=flix_compose merge.adapter=DIR merge.features.task=T merge.features.lang=L

The FLix sum over a feature set F, sum_f (alpha_f / r_f) B_f A_f, is itself a LoRA of rank
sum_f r_f: A's stacked (rows), B's concatenated (columns) with alpha_f / r_f folded in, and
lora_alpha = r so that peft applies it with scale 1. A language never seen in training is
left out (the task adapter alone) with a one-line notice; a task never trained is an error.
The maths is polyft.adapters.flix.compose_factors; the merge command does the store and records.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from polyft import console
from polyft.adapters.flix import WEIGHTS_FILE, FlixConfig, compose_to_peft, resolve_feature_set
from polyft.adapters.lora import copy_tokenizer
from polyft.errors import PolyftError
from polyft.merge.registry import register_adapter
from polyft.runs import read_manifest

KEY = "merge.adapter"


def adapter_dir(cfg, refs) -> Path:
    """merge.adapter: an expert of the experiment (trained) or a directory."""
    ref = cfg.merge.adapter
    if not ref:
        raise PolyftError(f"{KEY} is missing; give a FLix adapter directory (or an expert with adapter=flix)")
    if ref in cfg.experts:
        return refs.path(ref)
    path = Path(str(ref)).expanduser()
    if not path.is_dir():
        raise PolyftError(f"{KEY}={ref}: no such directory")
    return path.resolve()


def feature_set(cfg, directory: Path) -> tuple[dict, list[str]]:
    flix_cfg = FlixConfig.load(directory, KEY)
    wanted = OmegaConf.to_container(cfg.merge.features, resolve=True) if cfg.merge.features else {}
    wanted = {k: v for k, v in wanted.items() if v not in (None, "")}
    if not wanted:
        raise PolyftError("merge.features is empty; name the feature set, e.g. merge.features.task=T "
                          "merge.features.lang=L")
    return resolve_feature_set(flix_cfg, {k: str(v) for k, v in wanted.items()}, "merge.features")


def check(cfg, refs) -> None:
    directory = adapter_dir(cfg, refs)
    feature_set(cfg, directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise PolyftError(f"{KEY}={directory}: no {WEIGHTS_FILE} (safetensors weights) in the FLix directory")


def product_key(cfg, refs) -> dict:
    directory = adapter_dir(cfg, refs)
    fs, _ = feature_set(cfg, directory)
    m = read_manifest(directory) or {}
    ident = {"hash": m["hash"]} if m.get("hash") else \
        {"path": str(directory), "mtime": (directory / "flix_model.safetensors").stat().st_mtime_ns}
    return {"method": "flix_compose", "adapter": ident, "features": fs}


def build(cfg, out_dir: Path, refs) -> dict:
    directory = adapter_dir(cfg, refs)
    fs, notices = feature_set(cfg, directory)
    for notice in notices:
        console.echo(f"polyft: notice: {notice}")
    rank = compose_to_peft(directory, fs, out_dir)
    copy_tokenizer(out_dir, directory)
    return {"manifest": {"source": str(directory), "features": fs, "rank": rank, "notices": notices},
            "metrics": {"rank": rank, "features": fs}}


register_adapter("flix_compose", check=check, product_key=product_key, build=build)
