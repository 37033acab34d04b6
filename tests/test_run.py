"""Experiments end to end: `polyft run +exp=demo`, caching, sweeps, interruption, bad input."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error
from test_console import DEPENDENCY, assert_quiet_console, log_of

# flix_xtremeup needs an XTREME-UP release on disk: tests/test_flix_cli.py composes it with one.
EXPERIMENTS = sorted(p.stem for p in (REPO / "polyft" / "conf" / "exp").glob("*.yaml")
                     if p.stem != "flix_xtremeup")
# A quicker demo for the tests that check mechanics rather than numbers.
FAST = ["experts.math.train.max_steps=30", "experts.lang.train.max_steps=20", "eval.limit=6"]


def table_of(stdout: str) -> str:
    """The report tables as printed (Markdown lines starting with | or ###)."""
    return "\n".join(l for l in stdout.splitlines() if l.startswith(("|", "###")))


def rows_of(table: str, title_prefix: str) -> dict[str, list[str]]:
    out, inside = {}, False
    for line in table.splitlines():
        if line.startswith("###"):
            inside = line.startswith(f"### {title_prefix}")
        elif inside and line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def header_of(table: str, title_prefix: str) -> list[str]:
    lines = table.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(f"### {title_prefix}"))
    return [c.strip() for c in lines[i + 1].strip("|").split("|")][1:]


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(cli, exp):
    proc = cli("run", f"+exp={exp}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"exp_name: {exp}" in proc.stdout
    assert not (cli.cwd / "outputs" / "runs").exists()


def test_demo_end_to_end_real_numbers_then_cached(cli):
    start = time.time()
    first = cli("run", "+exp=demo")
    assert first.returncode == 0, first.stderr[-4000:]
    # the console: summary, a line per stage, the table, the records; the rest in the log
    run_dir = sorted((cli.cwd / "outputs" / "runs" / "run").rglob("run.json"))[-1].parent
    assert_quiet_console(first, run_dir)
    for stage in ("training model math ...", "training model lang ...", "merging swap (layer_swap) ...",
                  "evaluating base on demo ...", "evaluating ties on demo ..."):
        assert f"polyft: {stage}" in first.stdout, first.stdout
    assert re.search(r"^polyft: merge ties written to \S+ \(\d+\.\d s\)$", first.stdout, re.M)
    log = log_of(run_dir)
    assert "][lm_eval." in log and "][INFO] - " in log and DEPENDENCY.search(log)
    table = table_of(first.stdout)
    arith, words = rows_of(table, "demo_arith"), rows_of(table, "demo_words")
    assert set(arith) == {"base", "math", "lang", "swap", "soup", "ties"}, table
    langs = header_of(table, "demo_arith")
    assert {"en", "de", "sw", "ja"} <= set(langs)
    col = {lang: i for i, lang in enumerate(langs)}
    # the experts learned their skills: math beats base on English toy math, lang on Swahili words
    assert float(arith["math"][col["en"]]) > float(arith["base"][col["en"]]), table
    assert float(words["lang"][col["sw"]]) > float(words["base"][col["sw"]]), table
    first_s = time.time() - start

    start = time.time()
    again = cli("run", "+exp=demo")
    assert again.returncode == 0, again.stderr[-4000:]
    assert table_of(again.stdout) == table
    record = json.loads(sorted((cli.cwd / "outputs" / "runs" / "run").rglob("run.json"))[-1].read_text())
    assert record["artifacts"] and all(a["reused"] for a in record["artifacts"])
    print(f"demo: first run {first_s:.0f} s, cached run {time.time() - start:.0f} s")


def test_sweep_trains_each_expert_once_and_reports_a_heatmap(cli):
    sweep = cli.cwd / "sweep"
    proc = cli("run", "+exp=demo", *FAST, "-m", "merge.bottom=1,2", "merge.top=0,1",
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(4)]
    assert all(r["status"] == "ok" for r in records)
    for expert in ("math", "lang"):
        made = [a for r in records for a in r["artifacts"] if a.get("name") == expert and not a["reused"]]
        used = {a["path"] for r in records for a in r["artifacts"] if a.get("name") == expert}
        assert len(made) == 1 and len(used) == 1, (expert, made, used)
    swaps = {a["path"] for r in records for a in r["artifacts"] if a["role"] == "merged" and "swap" in a["path"]}
    assert len(swaps) == 4
    heatmaps = list((sweep / "report").glob("heatmap_*.png"))
    assert heatmaps
    import matplotlib.image as mpimg

    img = mpimg.imread(heatmaps[0])
    assert img.shape[0] > 100 and img[..., :3].std() > 0.01
    table = (sweep / "report" / "table.md").read_text()
    assert len([l for l in table.splitlines() if l.startswith("| swap (")]) >= 4
    # the points' lines tagged with their point, the table once, at the end
    assert proc.stdout.count("### demo_arith") == 1, proc.stdout
    assert proc.stdout.rindex("### demo_arith") > max(proc.stdout.rindex(f"[#{i}] ") for i in range(4))
    for i in range(4):
        assert f"[#{i}] polyft: records in {sweep / str(i)}" in proc.stdout
    # the shipped experiment logs to W&B offline: every point's runs in the sweep's group
    groups = {t["group"] for r in records for t in r.get("tracking", [])}
    assert groups == {f"demo sweep {sweep.parent.name}/{sweep.name}"}, groups
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in proc.stdout


def _newest_runs(root: Path, since: float) -> list[Path]:
    return [d.parent for d in (root / "outputs" / "runs" / "run").glob("*/*/run.json") if d.stat().st_mtime >= since]


# The CLI with its quick writes made slow enough to be killed in the middle of them: each
# tensor of a merge is followed by 50 ms, each report file by half a second. The slowness
# is the test's, patched in here, not a switch of polyft's.
SLOW_WRITES = """
import sys, time
from polyft.commands import report
from polyft.merge import io
write, text = io.ShardWriter.write, report.write_text
def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    time.sleep(0.05)
def slow_text(*args, **kwargs):
    text(*args, **kwargs)
    time.sleep(0.5)
io.ShardWriter.write, report.write_text = slow_write, slow_text
from polyft.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
# The demo at its smallest that still tells a resumed training from a fresh one: one merge
# (the swap), three tasks.
KILLED = ["+exp=demo", "experts.math.train.max_steps=60", "experts.math.train.save_steps=10",
          "experts.lang.train.max_steps=20", "eval.limit=10", "~baselines.soup", "~baselines.ties",
          "eval.tasks=[" + ",".join(f"{{name: demo_{t}, lang: {t[-2:]}, num_fewshot: 0, apply_chat_template: true}}"
                                    for t in ("arith_en", "words_en", "words_sw")) + "]"]


def test_killed_anywhere_the_rerun_completes_with_the_same_table(cli, cache_root):
    """SIGKILL of `polyft run +exp=demo` while it trains, merges, evaluates and writes the
    report, each followed by the same command: every rerun prints the table of a run that
    was never interrupted. The moments are read off the files and lines the run writes.
    Before the merge and eval kills, the products of those stages are removed, so that the
    run has them to make again; the trained experts are reused."""
    args = ["run", *KILLED]
    other = cli.cwd / "other"
    other.mkdir()
    (other / "models").symlink_to(cache_root / "models", target_is_directory=True)
    straight = cli(*args, f"output_root={other}")
    assert straight.returncode == 0, straight.stderr[-4000:]
    reference = table_of(straight.stdout)
    assert rows_of(reference, "demo_words").keys() == {"base", "math", "lang", "swap"}, reference

    store = cli.cwd / "outputs" / "artifacts"
    log = cli.cwd / "killed.log"

    def kill_when(moment, ready) -> list[Path]:
        since = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITES, *args], cwd=cli.cwd,
                                    stdout=out, stderr=subprocess.STDOUT)
        while time.time() < since + 600 and proc.poll() is None and not ready(since):
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before it was {moment}:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = _newest_runs(cli.cwd, since)
        assert [json.loads((d / "run.json").read_text())["status"] for d in killed] == ["running"], moment
        again = cli(*args)
        assert again.returncode == 0, (moment, again.stderr[-4000:])
        assert table_of(again.stdout) == reference, moment
        return killed

    def said(line: str) -> bool:
        return line in log.read_text()

    kill_when("training", lambda since: any(store.glob("model/.work/math-*/checkpoint-*/trainer_state.json")))
    for kind in ("merged", "eval"):  # made again by the next run, the experts reused
        shutil.rmtree(store / kind)
    kill_when("merging", lambda since: said("polyft: merging swap") and any(store.glob("merged/.tmp-swap-*/*")))
    shutil.rmtree(store / "eval")
    kill_when("evaluating", lambda since: said("polyft: evaluating lang on demo") and any(store.glob("eval/.tmp-*")))
    (killed,) = kill_when("writing the report", lambda since: any(
        (d / "report" / "table.md").exists() for d in _newest_runs(cli.cwd, since)))
    assert not (killed / "report" / "table.csv").exists()  # killed between two of the report's files


def test_each_command_runs_its_own_stage(cli):
    merge_first = cli("merge", "+exp=demo", *FAST)
    assert_user_error(merge_first, "math", "polyft train +exp=demo")
    assert cli("train", "+exp=demo", *FAST, "expert=math").returncode == 0
    records = sorted((cli.cwd / "outputs" / "runs" / "train").rglob("run.json"))
    assert [a["name"] for a in json.loads(records[-1].read_text())["artifacts"]] == ["math"]
    assert cli("train", "+exp=demo", *FAST).returncode == 0
    merged = cli("merge", "+exp=demo", *FAST)
    assert merged.returncode == 0, merged.stderr[-3000:]
    evaluated = cli("eval", "+exp=demo", *FAST)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rec = json.loads(sorted((cli.cwd / "outputs" / "runs" / "eval").rglob("run.json"))[-1].read_text())
    assert {r["model"] for r in rec["metrics"]["results"]} == {"base", "math", "lang", "swap", "soup", "ties"}


BAD = {
    "unknown_experiment": (["run", "+exp=nope"], ["exp=nope", "demo"]),
    "undefined_expert": (["train", "+exp=demo", "expert=ghost"], ["expert=ghost", "math"]),
    "merge_names_unknown_model": (["run", "+exp=demo", "baselines.soup.models=[math,ghost]"],
                                  ["baselines.soup", "ghost"]),
    "main_merge_unknown_model": (["run", "+exp=demo", "merge.middle=ghost"], ["merge", "ghost"]),
    "run_without_experiment": (["run"], ["+exp=NAME", "demo"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_experiment_input(cli, case):
    args, words = BAD[case]
    proc = cli(*args)
    assert_user_error(proc, *words)
    assert not (cli.cwd / "outputs" / "runs").exists()
    assert not (cli.cwd / "outputs" / "artifacts").exists()
