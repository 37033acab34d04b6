"""The console: what a command prints, and where everything else goes.

polyft's own lines (the config summary, one line per stage, tables, where the records are)
go to the terminal. Everything else written to stdout/stderr while a command works (the
logs and progress bars of transformers, datasets, lm-eval, peft, trl, bitsandbytes, Hydra's
job logging, Python warnings, subprocesses such as torchrun or git) goes to the run's log
file, `<run dir>/polyft.log`; with `verbose=true` it goes to the terminal as well.

The capture works on file descriptors 1 and 2, not on `sys.stdout`: libraries keep
references to the streams they found at import and child processes inherit descriptors, so
only the descriptors catch all of it. While a window is open, fds 1 and 2 are a pipe that a
thread copies into the log file (into memory before the run directory exists, i.e. during
preflight); polyft's own output uses duplicates of the original descriptors. Windows are
open during preflight and during each run (Hydra's task function), and closed in between,
so the processes a launcher starts (joblib) inherit the real terminal and open their own
window around their own run.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path

LOG_NAME = "polyft.log"
_VERBOSE_ARG = re.compile(r"^\+{0,2}verbose=(true|yes|on|1)$", re.IGNORECASE)

_out = None  # polyft's stdout and stderr: duplicates of the descriptors the process started with
_err = None
_window = None  # the open capture window, if any
_pending = bytearray()  # what was captured before a run directory existed
_verbose = False
_tag = ""  # a sweep point's `[#N] ` before each of its lines: parallel points' lines interleave


def _streams():
    global _out, _err
    if _out is None:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        _out = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        _err = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    return _out, _err


class _Window:
    """fds 1 and 2 go into a pipe; a thread copies what arrives to the log (or memory)."""

    def __init__(self, log: Path | None):
        self.lock = threading.Lock()
        self.log = open(log, "ab") if log else None
        if self.log:
            self.log.write(bytes(_pending))
            _pending.clear()
        for s in (sys.stdout, sys.stderr):
            s.flush()
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), name="polyft-console", daemon=True)
        self.thread.start()

    def _pump(self, read: int) -> None:
        while data := os.read(read, 1 << 16):
            with self.lock:
                if self.log:
                    self.log.write(data)
                    self.log.flush()
                else:
                    _pending.extend(data)
            if _verbose:
                _err.flush()
                os.write(_err.fileno(), data)
        os.close(read)

    def note(self, text: str) -> None:
        """A line of polyft's own into the log too, so the log reads as the whole story."""
        with self.lock:
            if self.log:
                self.log.write(text.encode("utf-8", "replace"))
                self.log.flush()
            else:
                _pending.extend(text.encode("utf-8", "replace"))

    def close(self) -> None:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        # Back to the original descriptors: the pipe's last write end in this process closes,
        # and the thread drains what is left and ends (a child still holding it is not waited for).
        os.dup2(_out.fileno(), 1)
        os.dup2(_err.fileno(), 2)
        self.thread.join(timeout=5)
        if self.log:
            with self.lock:
                self.log.close()
                self.log = None


def _open(log: Path | None) -> None:
    global _window
    _streams()
    if _window is None:
        _window = _Window(log)


def _close() -> None:
    global _window
    if _window is not None:
        window, _window = _window, None
        window.close()


def _excepthook(kind, value, tb):
    stop()  # a traceback of a real bug reaches the terminal
    sys.__excepthook__(kind, value, tb)


def start(args: list[str]) -> None:
    """Capture from the start of a command (before preflight imports anything heavy)."""
    global _verbose
    _verbose = any(_VERBOSE_ARG.match(a) for a in args)
    if not _verbose:
        # Dependencies' progress bars would only fill the log with carriage returns;
        # polyft's own bars (progress()) ask for themselves.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    sys.excepthook = _excepthook
    _open(None)


def pause() -> None:
    """Before the launcher starts its jobs: the terminal is theirs to inherit."""
    _close()


def stop() -> None:
    """End the capture (before a user error is printed, at exit); nothing captured is shown."""
    _close()
    _pending.clear()


def echo(text: str = "", err: bool = False) -> None:
    """A line (or block) of polyft's own to the terminal, and into the run's log."""
    out, errs = _streams()
    stream = errs if err else out
    if _tag:
        text = "\n".join(_tag + line for line in text.split("\n"))
    print(text, file=stream, flush=True)
    if _window is not None:
        _window.note(text + "\n")


def started(what: str) -> float:
    echo(f"polyft: {what} ...")
    return time.time()


def done(since: float, what: str) -> None:
    echo(f"polyft: {what} ({time.time() - since:.1f} s)")


def progress(total: int, desc: str, unit: str = "it"):
    """One bar for one piece of long work, on the terminal's stderr; shown only on a terminal
    and removed when done (the stage's done line follows)."""
    stream = _streams()[1]
    if not stream.isatty():
        return _NoBar(total)  # what tqdm's disable=None does off a terminal, without importing it (20 ms)
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{_tag}polyft: {desc}", unit=unit, file=stream, leave=False,
                disable=None, dynamic_ncols=True)


class _NoBar:
    """The bar off a terminal: nothing drawn, the count kept."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def train_bar():
    """A transformers TrainerCallback drawing progress() over the training steps."""
    from transformers import TrainerCallback

    class TrainBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress(state.max_steps, "training", unit="step")
            self.bar.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix_str(f"loss {logs['loss']:.4g}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainBar()


@contextlib.contextmanager
def job(run_dir: Path, cfg, record=None, point: str | None = None, lines: list[str] = ()):
    """One run (`point`: `#N overrides` of a sweep point, whose lines are tagged `[#N] `): its
    log file (with what preflight captured), `lines` (the config's summary) first, where the
    records are last."""
    global _verbose, _tag
    _verbose = _verbose or bool(cfg.get("verbose", False))
    _close()
    _open(Path(run_dir) / LOG_NAME)
    if record is not None:
        record.extra["log"] = LOG_NAME
    _tag = f"[{point.split()[0]}] " if point else ""
    for line in lines:
        echo(line)
    try:
        yield
        echo(f"polyft: records in {run_dir}: run.json, {LOG_NAME}")
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            traceback.print_exc()  # into the log; Hydra prints it on the terminal afterwards
            echo(f"polyft: failed; the log is {Path(run_dir) / LOG_NAME}", err=True)
        raise
    finally:
        _tag = ""
        _close()
