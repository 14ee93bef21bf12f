"""A warm start for `sftkit` processes in tests: `python tests/warm_cli.py` imports what every
command imports (torch, transformers, accelerate, peft, datasets and sftkit's modules: about 5 s
of each process on 2 cores), then forks one child per request. Each child is a process of its own
(its own pid, argv, working directory, environment, stdio and exit code) running the same
`sftkit.cli.main` as the console script; only the imports were done before it started.

What a child cannot show is what a fresh interpreter does while importing (import-time warnings,
start-up time): the tests of those run the console script itself (conftest.run_cli(fresh=True)).

A child may also run Python code ("code": `python -c`), a script ("script") or a module ("module":
`python -m`), for the tests of several processes whose code is not a command (processes racing on
the cache, a launcher's script) and for `accelerate launch` itself.

Protocol, one JSON object a line: the client writes {"args", "env", "cwd", "umask", "stdout",
"stderr", "timeout"} on the server's stdin; the server answers {"returncode"} (or {"timeout": true})
on the file descriptor it was given as its first argument. A process to signal or watch while it
runs: {"start": true, ...} is answered at once with {"pid"}; then {"poll": pid} with {"returncode"}
(null while it runs) and {"wait": pid, "timeout"} as above. A "stdout" or "stderr" of null is
/dev/null; the same file for both takes them as one stream.

The ranks of a real launcher (`accelerate launch`, torchrun) come here too: each rank runs
tests/warm_rank.py, which connects to the unix socket named by the server's second argument, sends
its {"args", "env", "cwd", "umask"} with its stdout and stderr (the descriptors themselves), and gets
{"pid"} and, when that child has ended, {"returncode"}.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
import warnings

# What a command imports, read off sys.modules after a LoRA run of the tiny model (accelerate
# imports deepspeed when it is installed; transformers' and the model's modules load lazily), and
# what `accelerate launch` imports (its CLI: the launcher is forked from here too)
WARM = ("torch", "transformers", "accelerate", "accelerate.commands.accelerate_cli", "datasets", "peft",
        "peft.tuners.lora", "deepspeed",
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
    os.umask(request.get("umask", 0o022))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    if "fds" in request:  # a rank's own stdout and stderr
        out, err = request["fds"]
    else:
        out = os.open(request["stdout"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        same = request["stderr"] is not None and request["stderr"] == request["stdout"]
        err = os.dup(out) if same else os.open(request["stderr"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    if os.environ.get("OMP_NUM_THREADS"):  # a launcher's rank: read at torch's import in a fresh process
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        run(request)
        code = 0
    except SystemExit as stop:  # what the console script's interpreter turns into its exit status
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (reported as an interpreter reports an uncaught exception)
        traceback.print_exc()
        code = 1
    # The exit handlers run as at any exit; the teardown of every imported module (torch's: about
    # 0.4 s a process) is skipped, as the fresh process would only free memory with it.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(request: dict) -> None:
    """`sftkit ARGS`; or with "code", `python -c CODE ARGS`; with "script", `python SCRIPT ARGS`; with
    "module", `python -m MODULE ARGS`."""
    if "code" in request:
        sys.argv = ["-c", *request["args"]]
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 (python -c)
    elif "script" in request:
        sys.argv = [request["script"], *request["args"]]
        runpy.run_path(request["script"], run_name="__main__")
    elif "module" in request:
        sys.argv = [request["module"], *request["args"]]
        # as `python -m` starts: the folder first, then $PYTHONPATH
        sys.path[:0] = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        # a module the warm-up imported (a launcher's) runs afresh as __main__, as `python -m` runs it;
        # runpy's warning that a copy is already imported is about the warm-up, not the module
        warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["sftkit", *request["args"]]
        from sftkit.cli import main

        main()


def listen(path: str) -> socket.socket:
    """The socket launcher ranks connect to, bound before the imports: a rank that comes early waits."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def serve(answer_fd: int, listener: socket.socket) -> None:
    answers = os.fdopen(answer_fd, "w", buffering=1)
    ranks: dict[int, socket.socket] = {}  # a launcher rank's child -> the connection its rank waits on
    ended: dict[int, dict] = {}  # started processes already reaped: their answers
    keep = [answers, listener]  # what a child must close

    def fork(request: dict) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for f in keep + list(ranks.values()):
                f.close()
            sys.stdin.close()
            child(request)
            raise SystemExit(0)
        return pid

    # the run or wait request being answered: (pid, deadline). The loop goes on meanwhile: the process
    # may be a launcher whose ranks connect here.
    pending: tuple[int, float] | None = None
    while True:
        ready, _, _ = select.select([sys.stdin, listener, *ranks.values()], [], [], 0.02)
        for pid, conn in list(ranks.items()):
            if conn in ready and not conn.recv(1, socket.MSG_PEEK):  # its stand-in is gone (SIGKILL): so is it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                conn.close()
                del ranks[pid]
        if listener in ready:
            conn, _ = listener.accept()
            request, fds = read_rank(conn)
            pid = fork({**request, "fds": fds})
            for fd in fds:
                os.close(fd)
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            ranks[pid] = conn
        for pid, conn in list(ranks.items()):
            answer = poll(pid)
            if answer["returncode"] is not None:
                conn.sendall((json.dumps(answer) + "\n").encode())
                conn.close()
                del ranks[pid]
        if pending is not None:
            answer = ended_by(*pending)
            if answer is not None:
                answers.write(json.dumps(answer) + "\n")
                pending = None
        if sys.stdin not in ready or pending is not None:  # the client asks once it has its answer
            continue
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        if "poll" in request:
            answer = ended.get(request["poll"]) or poll(request["poll"])
            if answer["returncode"] is not None:
                ended[request["poll"]] = answer
        elif "wait" in request and request["wait"] in ended:
            answer = ended[request["wait"]]
        elif "wait" in request:
            pending = (request["wait"], time.monotonic() + request["timeout"])
            continue
        else:
            pid = fork(request)
            if not request.get("start"):
                pending = (pid, time.monotonic() + request["timeout"])
                continue
            answer = {"pid": pid}
        answers.write(json.dumps(answer) + "\n")


def read_rank(conn: socket.socket) -> tuple[dict, list[int]]:
    """A rank's request: one JSON line, its stdout and stderr passed along with the first bytes."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("a rank hung up before its request was whole")
        data += more
    return json.loads(data), list(fds)


def poll(pid: int) -> dict:
    done, status = os.waitpid(pid, os.WNOHANG)
    return {"returncode": os.waitstatus_to_exitcode(status) if done else None}


def ended_by(pid: int, deadline: float) -> dict | None:
    """The answer to a run or wait: its exit code once it has ended, a time-out (its process group
    killed) past `deadline`, None while it runs."""
    answer = poll(pid)
    if answer["returncode"] is not None:
        return answer
    if time.monotonic() > deadline:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"timeout": True}
    return None


if __name__ == "__main__":
    ranks = listen(sys.argv[2])
    warm_up()
    serve(int(sys.argv[1]), ranks)
