"""A warm start for `sftkit` processes in tests: `python tests/warm_cli.py` imports what every
command imports (torch, transformers, accelerate, peft, datasets and sftkit's modules: about 5 s
of each process on 2 cores), then forks one child per request. Each child is a process of its own
(its own pid, argv, working directory, environment, stdio and exit code) running the same
`sftkit.cli.main` as the console script; only the imports were done before it started.

What a child cannot show is what a fresh interpreter does while importing (import-time warnings,
start-up time): the tests of those run the console script itself (conftest.run_cli(fresh=True)).

Protocol, one JSON object a line: the client writes {"args", "env", "cwd", "stdout", "stderr",
"timeout"} on the server's stdin; the server answers {"returncode"} (or {"timeout": true}) on the
file descriptor it was given as its first argument.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import sys
import time

# What a command imports, read off sys.modules after a LoRA run of the tiny model (accelerate
# imports deepspeed when it is installed; transformers' and the model's modules load lazily)
WARM = ("torch", "transformers", "accelerate", "datasets", "peft", "peft.tuners.lora", "deepspeed",
        "matplotlib.figure", "matplotlib.backends.backend_agg", "PIL.Image", "rich.console", "rich.progress", "rich.table", "safetensors.torch",
        "transformers.models.qwen3.modeling_qwen3", "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "transformers.models.qwen3_next.modeling_qwen3_next", "transformers.models.qwen3_5.modeling_qwen3_5",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "transformers.models.qwen2.modeling_qwen2",
        "sftkit.cli", "sftkit.commands", "sftkit.data.prepare", "sftkit.merge", "sftkit.train", "sftkit.evaluate",
        "sftkit.generate", "sftkit.quiet", "sftkit.report")


def warm_up() -> None:
    """Import what the commands import, before any fork (the children share these pages)."""
    for name in WARM:
        importlib.import_module(name)


def child(request: dict) -> None:
    """In the forked child: become the command's process, run it, exit with its code."""
    os.setpgid(0, 0)  # its own process group: a timeout kills its workers too
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.argv = ["sftkit", *request["args"]]
    from sftkit.cli import main

    try:
        main()
        code = 0
    except SystemExit as stop:  # what the console script's interpreter turns into its exit status
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    # The exit handlers run as at any exit; the teardown of every imported module (torch's: about
    # 0.4 s a process) is skipped, as the fresh process would only free memory with it.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(answer_fd: int) -> None:
    answers = os.fdopen(answer_fd, "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            sys.stdin.close()
            child(request)
            raise SystemExit(0)
        answers.write(json.dumps(wait(pid, request["timeout"])) + "\n")


def wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(0.02)


if __name__ == "__main__":
    warm_up()
    serve(int(sys.argv[1]))
