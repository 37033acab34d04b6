"""Shared fixtures: everything offline, tiny models built locally once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are cached across test sessions here (git-ignored).
CACHE_ROOT = Path(os.environ.get("POLYFT_TEST_CACHE", REPO / "outputs" / "test-cache"))


@pytest.fixture(scope="session")
def cache_root() -> Path:
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    return CACHE_ROOT


@pytest.fixture(scope="session")
def tiny_llama_dir(cache_root) -> Path:
    from polyft.models.tiny import TinySpec, ensure_tiny_model

    return ensure_tiny_model("tiny-llama", TinySpec(), cache_root)


@pytest.fixture(scope="session")
def tiny_mistral_dir(cache_root) -> Path:
    from polyft.models.tiny import TinySpec, ensure_tiny_model

    return ensure_tiny_model("tiny-mistral", TinySpec(arch="mistral"), cache_root)


def polyft(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run the real CLI in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "polyft.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path, cache_root):
    """polyft(...) in a fresh working directory whose outputs/models reuses the tiny-model cache."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "models").symlink_to(cache_root / "models", target_is_directory=True)

    def run(*args, **kw):
        return polyft(*args, cwd=tmp_path, **kw)

    run.cwd = tmp_path
    return run


def assert_user_error(proc, *words: str) -> None:
    """Exit 2, one line on stderr naming `words`, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def assert_refused(cli, command: str, *args: str, words: list[str]) -> None:
    """`polyft COMMAND ARGS output_dir=...` is a user error that writes no product and no run."""
    out = cli.cwd / "refused-product"
    proc = cli(command, *args, f"output_dir={out}")
    assert_user_error(proc, *words)
    assert not out.exists()
    assert not (cli.cwd / "outputs" / "runs").exists()
