"""The model card (README.md) of a trained product: what it is, the command that made it, the
settings that determine its weights (the product key), its training figures, how to load it.

It replaces PEFT's empty template. The command line is the run's own (the overrides Hydra's
run mode saved in <run dir>/.hydra/overrides.yaml), so the card names a command that makes
the same product again.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from polyft.runs import package_versions

# polyft.cli.compose turns `data.sources.NAME={...}` into three overrides; a card shows the one
_SOURCE_PARTS = (re.compile(r"^\+data\.sources=\{(?P<name>[\w-]+): \{\}\}$"),
                 re.compile(r"^~data\.sources\.(?P<name>[\w-]+)$"),
                 re.compile(r"^\+data\.sources=\{(?P<name>[\w-]+): (?P<value>\{.*\})\}$", re.S))


def overrides_of(run_dir: str | Path) -> list[str] | None:
    """The command-line overrides of the run in `run_dir`, as the user gave them (None when
    the run saved none: hydra.output_subdir=null)."""
    f = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    raw = [str(o) for o in OmegaConf.load(f)]
    out, i = [], 0
    while i < len(raw):
        parts = [p.match(o) for p, o in zip(_SOURCE_PARTS, raw[i:i + 3])]
        if len(parts) == 3 and all(parts) and len({m["name"] for m in parts}) == 1:
            out.append(f"data.sources.{parts[0]['name']}={parts[2]['value']}")
            i += 3
            continue
        if not raw[i].startswith(("command=", "config_dirs=")):
            out.append(raw[i])
        i += 1
    return out


def command_line(command: str, overrides: list[str]) -> str:
    return " ".join(["polyft", command, *(shlex.quote(o) for o in overrides)])


def _adapter_line(key: dict) -> str:
    a = key["adapter"]
    if a["type"] == "full":
        return "A fully fine-tuned model"
    if a["type"] == "flix":
        ranks = ", ".join(f"{t} r={r}" for t, r in a.get("ranks", {}).items())
        return f"A FLix adapter (one LoRA per feature value: {ranks})"
    kind = "DoRA" if a.get("dora") else "LoRA"
    targets = a.get("target_modules")
    return f"A {kind} adapter (r={a.get('r')}, alpha={a.get('alpha'):g}, on {', '.join(targets or [])})"


def _use(kind: str, flix: bool) -> str:
    if flix:
        return ("Evaluate it with `polyft eval eval.model=DIR`, or compose one feature set into a plain "
                "LoRA with `polyft merge merge=flix_compose merge.adapter=DIR merge.features.lang=L`.")
    if kind == "model":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"DIR\")  # this directory\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```")
    return ("```python\nimport os\n\nfrom peft import PeftConfig, PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "adapter = \"DIR\"  # this directory\n"
            "base = PeftConfig.from_pretrained(adapter).base_model_name_or_path\n"
            "if os.path.exists(os.path.join(adapter, base)):  # a base in the same output tree is named relative to here\n"
            "    base = os.path.join(adapter, base)\n"
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)\n"
            "tokenizer = AutoTokenizer.from_pretrained(adapter)\n```\n"
            "`polyft eval eval.model=DIR` and `polyft merge` read it as it is, from any directory.")


def _set(node):
    """The key without its unset (null) entries: what a reader needs to see."""
    if isinstance(node, dict):
        return {k: _set(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_set(v) for v in node]
    return node


def _figure(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def card(name: str, manifest: dict, made_by: str | None, alone: str | None, run_dir: str | Path,
         base_ref: str | None) -> str:
    """The README.md text of a trained product."""
    key, kind = manifest["key"], manifest["kind"]
    flix = key["adapter"]["type"] == "flix"
    langs = manifest.get("train_langs") or []
    front = ["---", f"library_name: {'transformers' if kind == 'model' or flix else 'peft'}",
             *([f"base_model: {base_ref}"] if base_ref and not Path(base_ref).is_absolute() and
               not base_ref.startswith(".") else []),
             "pipeline_tag: text-generation",
             "tags:", "- polyft", f"- {key['adapter']['type']}",
             *(["language:", *(f"- {lang}" for lang in langs)] if langs else []), "---"]
    data = key["data"]
    sources = ", ".join(f"{n} ({s.get('type')}{': ' + str(s['path']) if s.get('path') else ''})"
                        for n, s in data.get("sources", {}).items())
    quant = key["quant"].get("name") or "none"
    lines = [*front, "", f"# {name}", "",
             f"{_adapter_line(key)} of `{key['model'].get('name')}` (base: `{manifest.get('base_model')}`), "
             f"trained by polyft {package_versions().get('polyft', '')} with supervised fine-tuning"
             f"{'' if quant == 'none' else f' on a {quant} quantised base'}, "
             f"on data={data.get('name')} ({sources}).", "",
             "| | |", "|---|---|",
             f"| steps | {_figure(manifest.get('steps'))} |",
             f"| final training loss | {_figure(manifest.get('final_loss'))} |",
             *([f"| validation loss | {_figure(manifest['eval_loss'])} |"] if manifest.get("eval_loss") is not None else []),
             f"| languages | {', '.join(langs) or '-'} |",
             f"| product hash | {manifest.get('hash')} |", "",
             "## How it was made", ""]
    if made_by:
        lines += ["```sh", made_by, "```", ""]
        if alone and alone != made_by:
            lines += ["This product alone:", "", "```sh", alone, "```", ""]
    else:
        lines += ["(the run saved no command line)", ""]
    lines += [f"Run record: `{Path(run_dir) / 'run.json'}`. Running the command again reuses this "
              "product instead of training it again (its directory name ends in the hash of the "
              "settings below).", "",
              "## Configuration", "",
              "The settings that determine the weights (the product key):", "",
              "```yaml", OmegaConf.to_yaml(OmegaConf.create(_set(key))).rstrip(), "```", "",
              "## Use", "", _use(kind, flix), ""]
    return "\n".join(lines)


def write_card(directory: str | Path, text: str) -> None:
    (Path(directory) / "README.md").write_text(text, encoding="utf-8")
