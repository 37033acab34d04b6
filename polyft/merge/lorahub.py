"""merge=lorahub: compose LoRAs with weights searched on a few examples (Huang et al., 2023).

Given LoRAs (A_i [r, in], B_i [out, r] per module) on one base, the composed module is

    A* = sum_i w_i A_i,    B* = sum_i w_i B_i        (not sum_i w_i B_i A_i)

and w is found by nevergrad's gradient-free optimiser, bounded to merge.bounds, minimising
the few-shot loss (response tokens only, rows formatted exactly as `polyft train` formats
them) + merge.l1 * mean |w|.

By default this is the LoraHub authors' procedure (PyPI `lorahub` 0.1.0,
lorahub.algorithm.lorahub_learning), step for step, so the same adapters, shots and seed pick
the same weights (tests/test_lorahub_reference.py runs their package):
- objective=authors: the model's own batch-mean cross-entropy, added up over the shots'
  batches (merge.batch_size rows each in file order; null: all shots in one batch) and
  divided by the number of shots; objective=token_mean: the mean over every response token.
- the search: numpy's global seed set to merge.seed (42 there), w starting at 0,
  optimizer.minimize over merge.budget candidates, and the optimiser's recommendation (not
  necessarily the best candidate evaluated) is the answer.
- the composition: each factor times its weight, summed in adapter order, in float32.

The search loads the base once and puts the first adapter into it with PEFT; a candidate
is evaluated by writing its A*, B* into the live lora_A / lora_B weights in place and
running the forward passes, so a candidate costs about one forward pass over the shots.

Ranks must be equal, and so must alpha and rsLoRA: zero-padding a smaller rank would be
exact for the sum, but the adapters' scalings alpha/r would then differ and the product has
one scaling, so the product's tensors would no longer be sum w_i A_i. Refused instead.

Reads top to bottom: rules, inputs (no torch), then the maths, the objective, the search, build.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from polyft import console
from polyft.adapters.lora import WEIGHTS_FILE, copy_tokenizer, read_lora, read_lora_config, write_lora
from polyft.checks import choice
from polyft.data.formatting import check_chat_template, encode, use_chat_template
from polyft.data import rows as files
from polyft.errors import ConfigError, PolyftError
from polyft.merge.io import has_tokenizer, read_header
from polyft.merge.registry import register_adapter
from polyft.models.load import load_tokenizer
from polyft.runs import config_hash, fingerprint, read_manifest

KEY = "merge.adapters"
# adapter_config.json entries that change what the factors mean; they must agree
_SAME = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
_JSONL_MAX_LENGTH = 1024


OBJECTIVES = ("authors", "token_mean")


# ---------------------------------------------------------------- rules (pure)

def rules(m) -> None:
    if len(m.adapters) < 2:
        raise ConfigError(f"merge.adapters has {len(m.adapters)} adapter(s); merge=lorahub composes two or "
                          "more LoRA directories: merge.adapters=[a,b,...]")
    if m.budget <= 0:
        raise ConfigError(f"merge.budget={m.budget} is not allowed; the number of candidate evaluations must be > 0")
    if len(m.bounds) != 2 or not m.bounds[0] < m.bounds[1]:
        raise ConfigError(f"merge.bounds={list(m.bounds)} is not allowed; give [low, high] with low < high")
    if m.l1 < 0:
        raise ConfigError(f"merge.l1={m.l1} is not allowed; the L1 coefficient must be >= 0")
    if m.batch_size is not None and m.batch_size < 1:
        raise ConfigError(f"merge.batch_size={m.batch_size} is not allowed; it must be >= 1 (or null: all shots)")
    choice("merge.objective", m.objective, OBJECTIVES)
    if m.max_length is not None and m.max_length <= 8:
        raise ConfigError(f"merge.max_length={m.max_length} is not allowed; it must be > 8 (or null)")
    if m.data is None or (isinstance(m.data, str) and not m.data.strip()):
        raise ConfigError("merge.data is missing; merge=lorahub needs the few-shot examples: a jsonl file "
                          "with prompt and response fields, a data option name or a data config")


# ---------------------------------------------------------------- inputs (no torch)

@dataclass
class Inputs:
    adapters: list[Path]  # in the order of merge.adapters
    keys: list[str]  # merge.adapters[i], for messages
    configs: list[dict]
    names: list[str]  # the tensor names every adapter holds (lora_A / lora_B)
    base: Path


def _base_identity(ref: str) -> str:
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def resolve_inputs(cfg, refs) -> Inputs:
    """The adapter directories, after the rules that make their sum well defined."""
    m = cfg.merge
    paths, keys, configs, shapes = [], [], [], []
    for i, ref in enumerate(m.adapters):
        key = f"{KEY}[{i}]"
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{key}={ref}: expected a LoRA adapter directory or an expert name")
        try:
            path = refs.path(ref)
        except PolyftError as exc:
            raise type(exc)(f"{key}: {exc}") from None
        conf = read_lora_config(path, f"{key}={ref}")
        header, _ = read_header(path / WEIGHTS_FILE)
        others = [n for n in header if ".lora_A." not in n and ".lora_B." not in n]
        if others:
            raise PolyftError(f"{key}={path}: holds tensors other than LoRA factors ({others[0]}, e.g. "
                              "modules_to_save); only plain LoRA adapters can be composed")
        paths.append(path)
        keys.append(key)
        configs.append(conf)
        shapes.append({n: tuple(h["shape"]) for n, h in header.items()})
    first = configs[0]
    for key, path, conf, shape in zip(keys[1:], paths[1:], configs[1:], shapes[1:]):
        targets = [sorted(c["target_modules"]) if isinstance(c.get("target_modules"), list)
                   else c.get("target_modules") for c in (first, conf)]
        if targets[0] != targets[1]:
            raise PolyftError(f"{key}={path}: target modules {targets[1]} differ from {KEY}[0]'s {targets[0]}; "
                              "composed LoRAs must adapt the same modules")
        if set(shape) != set(shapes[0]):
            odd = sorted(set(shape) ^ set(shapes[0]))[0]
            raise PolyftError(f"{key}={path}: its LoRA modules differ from {KEY}[0]'s (e.g. {odd}); "
                              "composed LoRAs must adapt the same modules")
        for field in _SAME:
            if conf.get(field) != first.get(field):
                raise PolyftError(f"{key}={path}: {field}={conf.get(field)} but {KEY}[0] has "
                                  f"{field}={first.get(field)}; lorahub sums A_i (r x in) and B_i (out x r), "
                                  "so rank, alpha and rsLoRA must be equal")
        bad = next((n for n in shape if shape[n] != shapes[0][n]), None)
        if bad is not None:
            raise PolyftError(f"{key}={path}: {bad} has shape {list(shape[bad])}, {KEY}[0] has "
                              f"{list(shapes[0][bad])}; lorahub needs equal ranks and the same base")
    bases = [_base_identity(str(c.get("base_model_name_or_path") or "")) for c in configs]
    for key, path, b in zip(keys[1:], paths[1:], bases[1:]):
        if b != bases[0]:
            raise PolyftError(f"{key}={path}: its base is {b or '(none)'}, {KEY}[0]'s is {bases[0] or '(none)'}; "
                              "composed LoRAs must share one base model")
    if m.base:
        try:
            base = refs.path(m.base)
        except PolyftError as exc:
            raise type(exc)(f"merge.base: {exc}") from None
        where = f"merge.base={m.base}"
    else:
        base, where = Path(bases[0]), f"{KEY}[0]={paths[0]} names base {bases[0]!r}, which"
    if not (Path(base) / "config.json").is_file():
        raise PolyftError(f"{where} is not a local model directory; set merge.base=PATH to the base model")
    return Inputs(paths, keys, configs, sorted(shapes[0]), Path(base).resolve())


def few_shot_rows(cfg, refs) -> tuple[list[dict], int]:
    """The few-shot rows {prompt, response, lang, task} and the tokens kept per row: from a
    data option or mapping (the command layer's `refs.data`), else from a jsonl file."""
    m = cfg.merge
    found = refs.data(m.data)
    if found is not None:
        rows, max_length = found
        return rows, m.max_length or max_length
    path = Path(str(m.data)).expanduser()
    data = m.data
    if not path.is_file():
        raise PolyftError(f"merge.data={data}: no such file; give a jsonl file with "
                          f"{m.prompt_field} and {m.response_field} fields, or a data option name")
    label = f"merge.data={data}"
    rows = []
    for place, row in files.read(path, "jsonl", label):
        if m.prompt_field not in row or m.response_field not in row:
            raise PolyftError(f"{label}: {place} lacks {m.prompt_field!r} or {m.response_field!r} "
                              f"(has: {', '.join(sorted(row))}); set merge.prompt_field / merge.response_field")
        rows.append({"prompt": files.text(label, place, row, m.prompt_field),
                     "response": files.text(label, place, row, m.response_field),
                     "lang": files.text(label, place, row, "lang", optional=True) or "",
                     "task": files.text(label, place, row, "task", optional=True)})
    return rows, m.max_length or _JSONL_MAX_LENGTH


def tokenizer_dir(inputs) -> Path:
    """The first adapter that ships a tokenizer, else the base model."""
    return Path(next((p for p in inputs.adapters if has_tokenizer(p)), inputs.base))


def check(cfg, refs) -> None:
    inputs = resolve_inputs(cfg, refs)
    few_shot_rows(cfg, refs)
    check_chat_template(tokenizer_dir(inputs), cfg.model.chat_template)
    from nevergrad.optimization import registry

    if cfg.merge.optimizer not in registry:
        close = [n for n in ("NGOpt", "CMA", "TwoPointsDE", "OnePlusOne", "Cobyla") if n in registry]
        raise ConfigError(f"merge.optimizer={cfg.merge.optimizer} is not a nevergrad optimizer; "
                          f"use e.g. {', '.join(close)}")
    if cfg.output_dir:
        target = Path(cfg.output_dir).resolve()
        manifest = read_manifest(target) if target.is_dir() else None
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and \
                (not manifest or manifest.get("hash") != config_hash(product_key(cfg, refs))):
            raise PolyftError(f"output_dir={target} exists and holds something else; remove it or "
                              "choose another path")


def product_key(cfg, refs) -> dict:
    """Search parameters, the inputs' identity and the few-shot rows' content."""
    m = cfg.merge
    inputs = resolve_inputs(cfg, refs)
    rows, max_length = few_shot_rows(cfg, refs)
    params = {k: m[k] for k in ("method", "budget", "l1", "seed", "optimizer", "batch_size", "objective")}
    params.update(bounds=[float(b) for b in m.bounds], max_length=max_length, nevergrad=version("nevergrad"))
    return {"merge": params,
            "adapters": [{"path": str(p), **fingerprint(p)} for p in inputs.adapters],
            "base": {"path": str(inputs.base), **fingerprint(inputs.base)},
            "rows": config_hash(rows, 32)}


# ---------------------------------------------------------------- maths

def compose(factors: list, weights: list[float]):
    """sum_i w_i F_i in float32: each product rounded, then added in input order, as the
    authors' get_final_weights does (a fused multiply-add would change the last bit)."""
    import torch

    out = factors[0].to(torch.float32) * float(weights[0])
    for w, f in zip(weights[1:], factors[1:]):
        out = out + f.to(torch.float32) * float(w)
    return out


def composed_tensors(adapters: list, names: list[str], weights: list[float]) -> dict:
    """The product's safetensors: every lora_A and lora_B entry composed with `weights`."""
    return {n: compose([a.tensors[n] for a in adapters], weights).to(adapters[0].tensors[n].dtype)
            for n in names}


# ---------------------------------------------------------------- the objective

def few_shot_batches(rows: list[dict], tokenizer, max_length: int, batch_size: int | None,
                     chat_template: str = "model") -> list[tuple]:
    """(input_ids, attention_mask, labels) batches of `batch_size` rows in file order (None:
    one batch); labels are -100 outside the response. Rows are encoded by
    polyft.data.formatting.encode, as training encodes them (with the chat template
    model.chat_template names). The order matters: the authors' objective weighs every batch's
    mean equally."""
    import torch

    use_chat_template(tokenizer, chat_template, "the adapters' tokenizer")
    encoded = []
    for r in rows:
        e = encode({"lang": "", **r}, tokenizer)
        ids, mask = e["input_ids"][:max_length], e["completion_mask"][:max_length]
        if any(mask):
            encoded.append((ids, [t if keep else -100 for t, keep in zip(ids, mask)]))
    if not encoded:
        raise PolyftError(f"merge.data: no row keeps a response token within max_length={max_length}")
    batch_size = batch_size or len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, (row_ids, row_labels) in enumerate(chunk):
            ids[j, :len(row_ids)] = torch.tensor(row_ids)
            attn[j, :len(row_ids)] = 1
            labels[j, :len(row_ids)] = torch.tensor(row_labels)
        batches.append((ids, attn, labels))
    return batches


def few_shot_loss(model, batches: list[tuple], objective: str = "authors") -> float:
    """authors: sum over batches of the model's batch-mean cross-entropy (its own `loss`,
    accumulated in float32 as the authors' default_get_loss does), divided by the number of
    shots; token_mean: the mean cross-entropy over every response token of the batches."""
    import torch
    import torch.nn.functional as F

    total, count, rows = torch.zeros((), dtype=torch.float32), 0, 0
    with torch.inference_mode():
        for ids, attn, labels in batches:
            rows += len(ids)
            if objective == "authors":
                total = total + model(input_ids=ids, attention_mask=attn, labels=labels).loss.float()
                continue
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            target = labels[:, 1:]
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                            ignore_index=-100, reduction="sum").double()
            count += int((target != -100).sum())
    return float(total) / rows if objective == "authors" else float(total) / count


def live_factors(model, names: list[str]) -> dict:
    """Saved tensor name -> the live PEFT parameter it is loaded into (adapter 'default')."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        live = n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if live not in params:
            raise PolyftError(f"{KEY}: the adapter's tensor {n} has no module in the loaded model")
        out[n] = params[live]
    return out


class Composer:
    """The base loaded once with one LoRA module per target; a candidate w is written into it."""

    def __init__(self, base: Path, adapters: list, names: list[str]):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, str(adapters[0].path)).eval()
        self.live = live_factors(self.model, names)
        self.factors = {n: [a.tensors[n].to(torch.float32) for a in adapters] for n in names}

    def set_weights(self, weights: list[float]) -> None:
        import torch

        with torch.no_grad():
            for n, param in self.live.items():
                param.copy_(compose(self.factors[n], weights))


# ---------------------------------------------------------------- the search

def search(loss_fn, n: int, budget: int, bounds: tuple[float, float], l1: float, seed: int,
           optimizer: str) -> dict:
    """Minimise loss_fn(w) + l1 * mean|w| over w in [low, high]^n with `budget` evaluations,
    as lorahub_learning does: global numpy (and random) seeded, nevergrad's minimize loop with
    one worker, its recommendation returned. The trajectory records every candidate."""
    import nevergrad as ng
    import numpy as np

    # nevergrad draws its random state from numpy's global generator on first use; seeding that
    # generator, as the authors do, reproduces their path (a RandomState of our own would not)
    random.seed(seed)
    np.random.seed(seed)
    low, high = float(bounds[0]), float(bounds[1])
    # The paper starts from w = 0 (the base model); bounds that exclude 0 start mid-range.
    init = [0.0] * n if low < 0 < high else [(low + high) / 2] * n
    param = ng.p.Array(init=init, upper=[high] * n, lower=[low] * n)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
    trajectory = []

    def objective(w) -> float:
        w = [float(x) for x in w]
        loss = float(loss_fn(w))
        value = loss + l1 * sum(abs(x) for x in w) / n
        trajectory.append({"step": len(trajectory), "weights": w, "loss": loss, "objective": value})
        return value

    weights = [float(x) for x in opt.minimize(objective).value]
    chosen = next((t for t in reversed(trajectory) if t["weights"] == weights), None)
    if chosen is None:  # a recommendation never evaluated (e.g. CMA's mean): evaluate it once
        loss = float(loss_fn(weights))
        chosen = {"step": None, "weights": weights, "loss": loss,
                  "objective": loss + l1 * sum(abs(x) for x in weights) / n}
    return {"best": chosen, "trajectory": trajectory}


def build(cfg, out_dir: Path, refs) -> dict:
    """Search the weights on the few-shot rows, then write the composed LoRA into out_dir."""
    import torch

    m = cfg.merge
    inputs = resolve_inputs(cfg, refs)
    rows, max_length = few_shot_rows(cfg, refs)
    adapters = [read_lora(p, k) for p, k in zip(inputs.adapters, inputs.keys)]
    torch.manual_seed(m.seed)
    batches = few_shot_batches(rows, load_tokenizer(str(tokenizer_dir(inputs))), max_length, m.batch_size,
                               cfg.model.chat_template)
    composer = Composer(inputs.base, adapters, inputs.names)

    def loss_fn(w):
        composer.set_weights(w)
        return few_shot_loss(composer.model, batches, m.objective)

    start = time.perf_counter()
    result = search(loss_fn, len(adapters), m.budget, tuple(m.bounds), m.l1, m.seed, m.optimizer)
    seconds = time.perf_counter() - start
    best = result["best"]
    config = {**inputs.configs[0], "base_model_name_or_path": str(inputs.base)}
    write_lora(out_dir, config, composed_tensors(adapters, inputs.names, best["weights"]))
    copy_tokenizer(out_dir, *inputs.adapters, inputs.base)
    losses = [t["loss"] for t in result["trajectory"]]
    manifest = {"adapters": [str(p) for p in inputs.adapters], "refs": [str(r) for r in m.adapters],
                "base": str(inputs.base), "weights": best["weights"], "best_objective": best["objective"],
                "best_loss": best["loss"], "best_step": best["step"], "optimizer": m.optimizer,
                "objective": m.objective, "batch_size": m.batch_size,
                "budget": m.budget, "bounds": [float(b) for b in m.bounds], "l1": m.l1, "seed": m.seed,
                "shots": len(rows), "response_tokens": sum(int((b[2][:, 1:] != -100).sum()) for b in batches),
                "seconds": seconds, "seconds_per_candidate": seconds / m.budget,
                "trajectory": result["trajectory"]}
    metrics = {"lorahub_weights": best["weights"], "lorahub_best_objective": best["objective"],
               "lorahub_best_loss": best["loss"], "lorahub_loss_trajectory": losses,
               "lorahub_seconds_per_candidate": seconds / m.budget}
    at = "recommended" if best["step"] is None else f"at step {best['step']}"
    console.echo(f"polyft: lorahub weights {', '.join(f'{w:+.3f}' for w in best['weights'])} "
                 f"(few-shot loss {losses[0]:.4f} at step 0 -> {best['loss']:.4f} {at})")
    return {"manifest": manifest, "metrics": metrics}


register_adapter("lorahub", rules=rules, check=check, product_key=product_key, build=build)
