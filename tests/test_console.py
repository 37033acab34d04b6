"""The console: polyft's own lines on the terminal, dependency output in <run dir>/polyft.log.

The demo's console is checked in tests/test_run.py (test_demo_end_to_end...) with
assert_quiet_console below, on the demo run that test makes anyway."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# What dependencies print: logging lines with a level, Python warnings, progress bars,
# the trainer's loss dicts, bitsandbytes' kernel warning, a subprocess's git message.
DEPENDENCY = re.compile(r"\]\[(INFO|WARNING|DEBUG)\]|Warning:|it/s\]|examples/s\]|\{'loss'|\{'train_runtime'"
                        r"|bitsandbytes|kernels-community|fatal: not a git|Running loglikelihood")
QUICK_TRAIN = ("train", "train.max_steps=2", "train.logging_steps=1", "logger=none")


def console_of(proc) -> str:
    return proc.stdout + proc.stderr


def log_of(record_dir: Path) -> str:
    return (record_dir / "polyft.log").read_text(errors="replace")


def run_dirs(root: Path) -> list[Path]:
    return sorted((f.parent for f in root.rglob("run.json")), key=lambda d: d.stat().st_mtime)


def assert_quiet_console(proc, run_dir: Path, max_lines: int = 60) -> None:
    """Few lines, none of them a dependency's; the dependencies' lines are in the run's log."""
    text = console_of(proc)
    lines = text.splitlines()
    assert len(lines) < max_lines, text
    noisy = [line for line in lines if DEPENDENCY.search(line)]
    assert not noisy, noisy
    assert f"polyft: records in {run_dir}" in text, text
    assert json.loads((run_dir / "run.json").read_text())["log"] == "polyft.log"


def test_train_console_is_quiet_and_verbose_brings_the_logs_back(cli, tiny_llama_dir):
    quiet = cli(*QUICK_TRAIN)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    run_dir = run_dirs(cli.cwd / "outputs" / "runs")[-1]
    assert_quiet_console(quiet, run_dir, max_lines=8)
    out = quiet.stdout
    assert "polyft train seed=0" in out and "train demo: 2 steps" in out, out
    assert re.search(r"^polyft: training adapter tiny-llama-lora-r8-demo \.\.\.$", out, re.M), out
    assert re.search(r"^polyft: adapter tiny-llama-lora-r8-demo written to \S+ \(\d+\.\d s\)$", out, re.M), out
    log = log_of(run_dir)
    assert "{'loss'" in log and "{'train_runtime'" in log  # the trainer's lines went to the log
    assert "polyft: training adapter tiny-llama-lora-r8-demo ..." in log  # polyft's own lines too, in order
    # polyft passes TrainingArguments activation_checkpointing (config key train.gradient_checkpointing)
    assert "`gradient_checkpointing` is deprecated" not in log

    # verbose=true: the same dependency lines on the console, and still in the log
    loud = cli(*QUICK_TRAIN, "seed=1", "verbose=true")
    assert loud.returncode == 0, loud.stderr[-3000:]
    run_dir = run_dirs(cli.cwd / "outputs" / "runs")[-1]
    text = console_of(loud)
    assert "{'loss'" in text and "{'train_runtime'" in text, text[-3000:]
    assert "{'loss'" in log_of(run_dir)
    assert f"polyft: records in {run_dir}" in text


def test_multirun_points_each_log_into_their_own_run_dir(cli, tiny_llama_dir):
    sweep = cli.cwd / "sweep"
    proc = cli(*QUICK_TRAIN, "-m", "train.max_steps=1,2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = console_of(proc)
    assert not [line for line in text.splitlines() if DEPENDENCY.search(line)], text
    assert "point #0 train.max_steps=1" in text and "point #1 train.max_steps=2" in text, text
    for point, steps in ((0, 1), (1, 2)):
        assert f"polyft: records in {sweep / str(point)}" in text
        log = log_of(sweep / str(point))
        assert log.count("{'loss'") == steps, log  # logging_steps=1: one loss line per step, this point's
    assert len(text.splitlines()) < 16, text


def test_a_real_bug_still_shows_its_traceback(cli):
    """Not a user error: the traceback reaches stderr, and the log holds it too."""
    code = ("import sys, polyft.commands.train as t\n"
            "def broken(cfg, record):\n    raise RuntimeError('a real bug')\n"
            "t.command = broken\n"
            "from polyft.cli.main import main\n"
            "sys.exit(main(['train', 'logger=none']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cli.cwd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a real bug" in proc.stderr, proc.stderr
    run_dir = run_dirs(cli.cwd / "outputs" / "runs")[-1]
    assert f"the log is {run_dir / 'polyft.log'}" in proc.stderr
    assert "RuntimeError: a real bug" in log_of(run_dir)


def on_terminal(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """What `python -m polyft.cli ARGS` shows on a terminal (a pty of 100 columns)."""
    import fcntl
    import os
    import select
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "polyft.cli", *args], cwd=cwd, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return out.decode("utf-8", "replace")


def test_one_bar_for_eval_requests_and_merge_tensors_on_a_terminal_only(cli, tiny_llama_dir):
    """On a terminal: polyft's bar over lm-eval's requests (lm-eval's own bars stay off) and
    over a merge's tensors; in a pipe (the test's capture), no bar at all."""
    merged = on_terminal(["merge", "merge=linear", f"merge.models=[{tiny_llama_dir},{tiny_llama_dir}]",
                          "logger=none"], cli.cwd)
    from polyft.merge.io import read_header

    n_tensors = len([k for k in read_header(tiny_llama_dir / "model.safetensors")[0] if k != "__metadata__"])
    assert re.search(rf"polyft: merging linear: +\d+%\|.*\| *\d+/{n_tensors} ", merged), merged
    shown = on_terminal(["eval", "eval=demo", "eval.limit=8", "logger=none"], cli.cwd)
    frames = shown.replace("\r", "\n").splitlines()
    assert any(re.search(r"polyft: eval: generation: +\d+%\|.*\| *\d+/32 ", f) for f in frames), shown
    assert any(re.search(r"polyft: eval: loglikelihood: +\d+%\|.*\| *\d+/\d+ ", f) for f in frames), shown
    assert not any("Running loglikelihood requests" in f or "Running generate_until" in f for f in frames), shown
    piped = cli("eval", "eval=demo", "eval.limit=8", "logger=none", "seed=1")
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "%|" not in console_of(piped)


def test_training_bar_shows_the_loss_on_a_terminal(cli, tiny_llama_dir):
    shown = on_terminal(["train", "train.max_steps=3", "train.logging_steps=1", "logger=none"], cli.cwd)
    record = json.loads(sorted((cli.cwd / "outputs" / "runs").rglob("run.json"))[-1].read_text())
    frames = shown.replace("\r", "\n").splitlines()
    bars = [f for f in frames if re.search(r"polyft: training: +\d+%\|", f)]
    assert bars, shown
    logged = {f"loss {h['loss']:.4g}" for h in record["history"]}
    assert any(any(text in f for text in logged) for f in bars), (logged, bars)


def compose_in_process(command: str, *overrides: str, dirs=()):
    from polyft.cli.compose import compose

    return compose(command, list(overrides), dirs=list(dirs))


def test_summary_lines_say_what_runs(tmp_path):
    from polyft.config.summary import lines

    demo = "\n".join(lines(compose_in_process("run", "+exp=demo")))
    assert "  expert math: model tiny-llama, adapter full, quant none; data demo_math, train demo: 300 steps" in demo, demo
    assert "  expert lang: model tiny-llama, adapter full, quant none; data demo_lang, train demo: 250 steps" in demo, demo
    assert "lora" not in demo
    merges = [line for line in demo.splitlines() if line.startswith("  merge ")]
    assert merges == ["  merge swap (layer_swap): middle math, outer lang, bottom 1, top 1",
                      "  merge soup (linear): math, lang", "  merge ties: math, lang"], demo
    assert "  eval demo on base, math, lang, swap, soup, ties" in demo
    # an experiment that names no merge: no merge line
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "solo.yaml").write_text("# @package _global_\nexp_name: solo\n"
                                               "experts:\n  one: {data: demo_math}\n")
    solo = lines(compose_in_process("run", "+exp=solo", f"config_dirs=['{tmp_path}']", dirs=[tmp_path]))
    assert not [line for line in solo if "merge" in line], solo
    assert "  expert one: model tiny-llama, adapter lora r=8 alpha=16" in "\n".join(solo)
    # eval names a model by its whole path
    path = "/data/a/rather/long/path/to/outputs/artifacts/adapter/tiny-llama-lora-505484374205"
    assert f"  eval demo on {path}" in lines(compose_in_process("eval", f"eval.model={path}"))[1]


def test_eval_table_labels_are_whole_product_names():
    from polyft.eval.harness import format_rows

    row = {"task": "demo_words_en", "lang": "en", "metric": "acc", "filter": "none", "value": 0.5,
           "stderr": 0.1, "n": 4}
    a = "/x/outputs/artifacts/adapter/tiny-llama-lora-with-a-long-name-505484374205"
    table = format_rows([{**row, "model": "base"}, {**row, "model": a}])
    assert "\ntiny-llama-lora-with-a-long-name-505484374205 " in table, table
    twins = ["/x/one/merged", "/x/two/merged"]  # the same last part: whole paths
    table = format_rows([{**row, "model": m} for m in twins])
    assert all(f"\n{m} " in table for m in twins), table
