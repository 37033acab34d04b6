"""The commands, in one table. Each module holds `preflight(cfg)`, the checks that read files
(model directories, data, checkpoint headers) and run after the config's pure rules
(polyft.config.rules.validate), and `command(cfg, record)`, which runs in its run directory.
`plan` prints and writes nothing: it has `show(points)` instead."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    help: str
    makes_run: bool = True  # a run directory, run.json, Hydra's launcher for -m
    details: str = ""  # more for `polyft COMMAND --help`
    # What the command reads, for its --help: config groups (conf/<group>/ options, or a
    # schema section such as report), then root keys; `exp` stands for an experiment's keys.
    groups: tuple = ()
    keys: tuple = ()


RUN_KEYS = ("seed", "output_root", "output_dir", "offline", "allow_pickle", "verbose")
TRAINING = ("model", "adapter", "quant", "data", "train")

COMMANDS = {c.name: c for c in (
    Command("train", "polyft.commands.train", "supervised fine-tuning: full, LoRA, QLoRA 4/8-bit, FLix, on multilingual mixtures",
            groups=(*TRAINING, "logger", "exp"), keys=(*RUN_KEYS, "merge_back", "expert", "resources")),
    Command("merge", "polyft.commands.merge", "merge models or LoRAs: {merge_methods}",
            groups=("merge", "model", "exp"), keys=RUN_KEYS),
    Command("eval", "polyft.commands.eval", "per-language evaluation through lm-evaluation-harness",
            groups=("eval", "model", "quant", "logger", "exp"), keys=RUN_KEYS),
    Command("run", "polyft.commands.run", "an experiment's stages end to end (train, merge, eval, report), cached",
            groups=(*TRAINING, "logger", "merge", "eval", "report", "exp"),
            keys=(*RUN_KEYS, "merge_back", "expert", "resources")),
    Command("report", "polyft.commands.report", "paper-style tables and plots from the runs on disk",
            groups=("report", "exp"), keys=("output_root", "verbose")),
    Command("plan", "polyft.commands.plan", "per run / sweep point: what it trains and the accelerator memory it needs",
            makes_run=False, details="""For every run (every sweep point with -m): what it trains and its estimated peak
accelerator memory, without loading any weights. plan.fit=true (train/run under
hydra/launcher=slurm) sets each point's mem_gb and GPUs per node from this estimate.
Several GPUs: train.num_processes=N (the world size, over hydra.launcher.nodes) with
train.distributed=ddp|fsdp|deepspeed gives the memory per GPU of that layout, the host
memory per node, what plan.fit asks SLURM for, and every layout's per-GPU peak at 1-16 GPUs.
e.g. polyft plan +exp=maple -m adapter.r=8,64 quant=4bit,none""",
            groups=("plan", *TRAINING, "exp"), keys=("seed", "output_root", "offline", "expert", "resources")),
    Command("ls", "polyft.commands.ls", "the stored products (trained, merged, evaluated): key settings, size, date",
            makes_run=False, details="""usage: polyft ls [WORD ...] [output_root=DIR]
One table per kind (adapter, model, merged, eval): name, model, adapter and rank, quant, data,
steps, loss (validation loss when there is one), size, date. Products written to an
output_dir are listed by their path. A WORD keeps the rows that contain it (all words must
match), e.g. polyft ls lora r=8""",
            groups=(), keys=("output_root",)),
)}


def module(name: str):
    return importlib.import_module(COMMANDS[name].module)
