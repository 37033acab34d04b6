"""A process that has imported the heavy libraries once (torch, transformers, datasets,
lm-eval, Hydra, accelerate) and forks one child per `polyft ...` command line of the tests.

Each child is a process of its own, as `python -m polyft.cli ARGS` in a subprocess is: its own
working directory, environment, stdin (/dev/null), stdout and stderr (files the test reads),
exit code; polyft.cli runs in it as __main__ (runpy, as `-m` does), and it exits through the
interpreter's normal exit (atexit handlers, logging shutdown). What a child does not do is
import torch and the rest again: about 5 s of CPU per command that trains, merges or evaluates.
Only libraries that print nothing when imported are preloaded (see PRELOAD).

Protocol (one JSON object per line): stdin gets {"args", "cwd", "env", "out", "err"}; stdout
answers {"pid": N} when the child starts and {"pid": N, "status": CODE} when it has exited
(CODE negative: killed by that signal, as subprocess reports it).
"""

from __future__ import annotations

import json
import os
import sys

# Silent imports only. Not peft, trl or transformers.trainer: they import bitsandbytes, whose
# warning (kernels-community) each command must print into its own console window as before;
# what they import besides it is here.
PRELOAD = ("torch", "transformers", "datasets", "safetensors.torch", "lm_eval", "lm_eval.evaluator",
           "hydra", "omegaconf", "hydra._internal.hydra", "transformers.modeling_utils",
           "transformers.loss.loss_utils", "torch._inductor.compile_fx", "torch.distributed.tensor",
           "transformers.distributed.fsdp", "scipy.optimize", "transformers.models.llama.modeling_llama",
           "transformers.models.mistral.modeling_mistral", "accelerate")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # another version of a library: its children import what they need
            pass
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy in transformers)


def child(request: dict) -> None:
    """In the forked child: become `python -m polyft.cli ARGS` in the request's directory."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["out"], os.O_WRONLY | os.O_TRUNC)
    err = os.open(request["err"], os.O_WRONLY | os.O_TRUNC)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    sys.argv = ["polyft", *request["args"]]
    runpy.run_module("polyft.cli", run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve() -> None:
    preload()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reply.close()
            child(request)  # exits the child (SystemExit, or an exception's traceback and 1)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        reply.write(json.dumps({"pid": pid, "status": code}) + "\n")


if __name__ == "__main__":
    serve()
