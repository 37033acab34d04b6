"""`polyft plan`: the per-point table, its speed, bad input, and the estimator against the
measured peak memory of real CPU training steps."""

from __future__ import annotations

import re
import time
import weakref

import pytest

from conftest import assert_user_error

# The estimate may differ from the measured peak by this much (it counts the tensors autograd
# keeps with a per-layer formula; allocator caching and the optimizer's temporaries are not in it).
TOLERANCE = 0.25


def plan_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in l.strip("|").split("|")] for l in stdout.splitlines()
            if l.startswith("| #") or re.match(r"\| \S", l) and not l.startswith("| point")]


def test_maple_sweep_prints_four_points_fast(cli):
    start = time.time()
    proc = cli("plan", "+exp=maple", "-m", "adapter.r=8,64", "quant=4bit,none")
    took = time.time() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[0]: r for r in plan_rows(proc.stdout)}
    assert set(rows) == {"#0 adapter.r=8 quant=4bit", "#1 adapter.r=8 quant=none",
                         "#2 adapter.r=64 quant=4bit", "#3 adapter.r=64 quant=none"}, proc.stdout
    col = {name: i for i, name in enumerate(["point", "model", "trains", "trainable", "total", "bits", "weights",
                                             "adapter", "grads", "optim", "acts", "acts ckpt", "gathered", "peak", "fits"])}
    r8, r64 = rows["#0 adapter.r=8 quant=4bit"], rows["#2 adapter.r=64 quant=4bit"]
    # LoRA on q,k,v,o of Llama-2-7B: 32 layers x 4 x r x (4096 + 4096) parameters
    assert r8[col["trainable"]] == f"{32 * 4 * 8 * 8192 / 1e6:.2f}M" and r64[col["trainable"]] == "67.11M"
    assert r8[col["total"]].startswith("6.7") and r8[col["bits"]] == "4" and rows["#1 adapter.r=8 quant=none"][col["bits"]] == "16"
    w4, w16 = float(r8[col["weights"]]), float(rows["#1 adapter.r=8 quant=none"][col["weights"]])
    assert 3.3 < w4 < 3.9 and 12.3 < w16 < 12.8  # 4.13 bits per linear weight; 6.74B x 2 bytes
    assert all(r[col["fits"]] == "24 GB" for r in rows.values())
    assert not (cli.cwd / "outputs" / "multirun").exists() and not (cli.cwd / "outputs" / "runs").exists()
    print(f"plan of 4 maple points: {took:.1f} s")


def test_full_finetuning_of_a_7b_needs_an_80gb_gpu_and_checkpointing_shrinks_activations(cli):
    proc = cli("plan", "model=llama-2-7b", "adapter=full", "train=full_7b", "data.max_length=2048", "-m",
               "train.gradient_checkpointing=true,false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (on, off) = plan_rows(proc.stdout)
    assert on[-1] == "80 GB" and off[-1] == "> 80 GB"  # 6.74B x (2 + 2 + 4) bytes = 54 GB before activations
    assert float(on[10].rstrip(" *")) > 4 * float(on[11].rstrip(" *"))


@pytest.mark.parametrize("args,words", [
    (["quant=3bit"], ["quant=3bit", "4bit"]),
    (["+exp=maple", "adapter.rank=4"], ["adapter.rank", "unknown key"]),
    (["plan.device=tpu"], ["plan.device=tpu", "gpu"]),
    (["model=llama-2-7b", "model.vocab_size=null"], ["model.vocab_size"]),
])
def test_a_config_that_does_not_compose_is_one_line(cli, args, words):
    assert_user_error(cli("plan", *args), *words)


class PeakMemory:
    """Peak bytes of live tensor storages created inside the context (a dispatch mode)."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        seen = set()

        def free(key, n):
            seen.discard(key)
            tracker.live -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # A view (t(), view, detach) of an input shares its storage: no new memory.
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        if st.nbytes() and st.data_ptr() not in seen and st.data_ptr() not in inputs:
                            seen.add(st.data_ptr())
                            tracker.live += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, free, st.data_ptr(), st.nbytes())
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def measured_peak(cfg, model_path: str, steps: int = 2) -> float:
    """Weights plus the peak of `steps` real training steps (forward, loss, backward, AdamW),
    on the model polyft's trainer would build, in fp32 on CPU."""
    import torch
    from peft import get_peft_model

    from polyft.training import build_model

    torch.manual_seed(0)
    model, lora = build_model(cfg, model_path)
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora is not None:
        model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (cfg.train.batch_size, cfg.data.max_length))
    with PeakMemory() as pm:
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return weights + pm.peak


def _compare(model_dir, overrides: list[str]):
    from polyft.cli.compose import compose
    from polyft.commands.plan import estimate

    cfg = compose("plan", ["plan.device=cpu", f"model.path={model_dir}", *overrides])
    est = estimate(cfg).peak
    real = measured_peak(cfg, str(model_dir))
    print(f"{' '.join(overrides)}: estimate {est / 2**20:.1f} MiB, measured {real / 2**20:.1f} MiB, "
          f"ratio {est / real:.2f}")
    assert abs(est / real - 1) <= TOLERANCE, (overrides, est, real)


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("ckpt", ["false", "true"])
def test_estimate_matches_measured_peak_tiny(tiny_llama_dir, adapter, ckpt):
    _compare(tiny_llama_dir, ["model=llama-2-7b", f"adapter={adapter}", f"train.gradient_checkpointing={ckpt}",
                              "train.batch_size=4", "data.max_length=64"])


def test_estimate_matches_measured_peak_smollm2(request):
    try:
        model_dir = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_dir fixture (the real SmolLM2 model) in this checkout")
    _compare(model_dir, ["model=llama-2-7b", "adapter=lora", "adapter.target_modules=[all-linear]",
                         "train.batch_size=2", "data.max_length=64"])
