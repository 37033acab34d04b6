"""hydra/launcher=submitit_local: sweep points as local submitit jobs (polyft's launcher)."""

from __future__ import annotations

import json
from pathlib import Path


def test_submitit_local_sweep_finishes_every_point(cli, tiny_llama_dir):
    sweep = cli.cwd / "sweep"
    proc = cli("train", "-m", "adapter.r=4,8", "train.max_steps=2", "hydra/launcher=submitit_local",
               "logger=none", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr[-3000:]
    records = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(2)]
    assert [r["status"] for r in records] == ["ok", "ok"]
    ranks = []
    for r in records:
        adapter = Path(r["artifacts"][0]["path"])
        if not adapter.is_absolute():
            adapter = cli.cwd / adapter
        ranks.append(json.loads((adapter / "adapter_config.json").read_text())["r"])
    assert sorted(ranks) == [4, 8]
    # each point ran as a submitit job of its own (polyft's launcher, not Hydra's basic one)
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2 and all(any(d.glob("*_log.out")) for d in jobs)
