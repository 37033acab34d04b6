"""lm-eval's vLLM backend (eval.backend=vllm), with one engine per base model.

Adapters are served by vLLM's LoRA support: the engine starts with enable_lora and each
adapter is a LoRARequest swapped into lm-eval's VLLM wrapper. vLLM silently serves the base
when an adapter does not fit its LoRA settings (rank above max_lora_rank, modules it does
not support), so every adapter is first scored on a probe against the base, and identical
scores stop the run instead of reporting base numbers under the adapter's name.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from polyft.errors import PolyftError
from polyft.eval.models import ModelRef

PROBE = ("The capital of France is", " Paris, and the capital of Kenya is Nairobi.")


def check_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise PolyftError("eval.backend=vllm but vllm is not installed; pip install vllm (needs a GPU), "
                          "or use eval.backend=hf")


def check_parallel(models: list[ModelRef], tensor_parallel_size: int, data_parallel_size: int) -> None:
    """What vLLM would refuse only once its workers start: a tensor-parallel size that does
    not split the attention heads (KV heads are split, or replicated when fewer), and data
    parallelism without Ray, through which lm-eval runs the engines."""
    if data_parallel_size > 1 and importlib.util.find_spec("ray") is None:
        raise PolyftError(f"eval.data_parallel_size={data_parallel_size} needs ray, through which lm-eval runs "
                          "one vLLM engine per replica; pip install ray")
    if tensor_parallel_size == 1:
        return
    for base in dict.fromkeys(m.base_path for m in models):
        f = Path(base) / "config.json"
        if not f.is_file():
            continue  # a hub id: vLLM checks it
        conf = json.loads(f.read_text())
        conf = conf.get("text_config", conf)
        heads = conf.get("num_attention_heads")
        kv = conf.get("num_key_value_heads") or heads
        if heads and (heads % tensor_parallel_size or (kv % tensor_parallel_size and tensor_parallel_size % kv)):
            raise PolyftError(f"eval.tensor_parallel_size={tensor_parallel_size} does not split {base}'s {heads} "
                              f"attention heads ({kv} key/value heads); use a divisor of {heads}")


def _lora_rank(path: str) -> int:
    conf = json.loads((Path(path) / "adapter_config.json").read_text())
    ranks = [conf.get("r") or 8, *(conf.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def _probe(lm) -> float:
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, arguments=PROBE, idx=0)
    return lm.loglikelihood([req], disable_tqdm=True)[0][0]


class VLLMModels:
    """One vLLM engine per base; adapters are LoRARequests on it."""

    def __init__(self, models: list[ModelRef], *, dtype: str = "auto", batch_size="auto",
                 trust_remote_code: bool = False, seed: int = 0, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1):
        self.models = models
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.dtype = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                      "float16": "float16", "fp16": "float16"}.get(dtype, "auto")
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.seed = seed
        self._engine = None
        self._engine_base = None
        self._base_score = None

    def engine_args(self, base: str) -> dict:
        """lm-eval's VLLM arguments for the engine of `base`: lm-eval hands tensor_parallel_size
        to vLLM's LLM and runs data_parallel_size engines as Ray workers."""
        adapters = [m for m in self.models if m.kind == "adapter" and m.base == base]
        kwargs = dict(pretrained=base, dtype=self.dtype, batch_size=self.batch_size, seed=self.seed,
                      trust_remote_code=self.trust_remote_code, tensor_parallel_size=self.tensor_parallel_size,
                      data_parallel_size=self.data_parallel_size)
        if adapters:  # the first adapter enables LoRA; the others are swapped in per request
            kwargs.update(lora_local_path=adapters[0].path, max_lora_rank=max(_lora_rank(a.path) for a in adapters))
        return kwargs

    def _start(self, base: str):
        from lm_eval.models.vllm_causallms import VLLM

        adapters = [m for m in self.models if m.kind == "adapter" and m.base == base]
        self._engine, self._engine_base = VLLM(**self.engine_args(base)), base
        self._engine.lora_request = None
        self._base_score = _probe(self._engine) if adapters else None

    def lm(self, m: ModelRef):
        from vllm.lora.request import LoRARequest

        base = m.base_path
        if self._engine_base != base:
            self._engine = None
            self._start(base)
        if m.kind == "model":
            self._engine.lora_request = None
            return self._engine
        index = self.models.index(m) + 1
        self._engine.lora_request = LoRARequest(f"adapter{index}", index, m.path)
        score = _probe(self._engine)
        if abs(score - self._base_score) < 1e-6:
            raise PolyftError(f"eval.model={m.ref}: vLLM did not apply the adapter (its probe score equals the "
                              "base's); check its rank and target modules, or use eval.backend=hf")
        return self._engine
