"""Rendering and tokenizing in child processes: the parent hands out chunks of rows, one at a time
to whichever child is free, and puts the results back in row order.

Each child is `python -c` running `serve()`, fed pickled frames on its stdin, not a
multiprocessing Pool: a spawned Pool child re-runs the caller's main script (a user's
`SFTDataset(...)` at the top of a script without an `if __name__ == "__main__"` guard), and a Pool
whose child dies while starting respawns it forever, the parent waiting on a result that never
comes. Here a child that dies ends the prepare with its exit code.

Ctrl-C: the children start with SIGINT blocked, so the terminal's SIGINT to the process group
reaches only the parent, which kills and reaps every child before the KeyboardInterrupt goes on. A
child whose parent is gone reads end-of-file on its stdin (or a broken pipe on its reply) and exits.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

from sftkit.errors import SftkitError

_LENGTH = struct.Struct("<Q")  # each frame: its length in 8 bytes, then the pickle
# the parent's sys.path, as multiprocessing's spawn hands it on: the child imports the same sftkit
# and transformers as the parent (`python -c` alone would put the working directory first)
_CHILD = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from sftkit.data.workers import serve; serve()"


class WorkerDied(SftkitError):
    """A tokenizing child process ended before it sent all its results: killed (the kernel's
    out-of-memory killer sends SIGKILL), or its own error printed above."""

    def __init__(self, code: int):
        if code < 0 and -code in signal.valid_signals():
            said = (f"was killed by {signal.Signals(-code).name} before it finished (the out-of-memory killer "
                    "sends SIGKILL: each process holds its share of the rows and a tokenizer; lower --num_proc)")
        else:
            said = f"exited with code {code} before it finished; its own error is above"
        super().__init__(f"a tokenizing process {said}")


def _send(stream, obj, data: bytes | None = None) -> None:
    """One frame: `obj` pickled, or `data` when it is already."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if data is None else data
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream):
    """The next frame's object, or None at end of stream."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def serve() -> None:
    """A child's whole life: (tokenizer, options, spec), then (convs, tools, switches) chunks in,
    one render_batch result out for each (as columns: sftkit.data.columns.pack), until its stdin closes."""
    from sftkit.data.columns import pack
    from sftkit.data.render import render_batch

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    tasks = sys.stdin.buffer
    try:
        setup = _receive(tasks)
        if setup is None:
            return
        tokenizer, opts, spec = setup
        while (chunk := _receive(tasks)) is not None:
            convs, tools, switches = chunk
            _send(replies, pack(render_batch(convs, tokenizer, spec, opts, tools, switches)))
    except BrokenPipeError:  # the parent is gone: nobody is left to tell
        pass


def _start(n: int) -> list[subprocess.Popen]:
    """n children with SIGINT blocked (a signal mask passes through fork and exec, and Python's
    start-up keeps it), so none prints a KeyboardInterrupt traceback of its own."""
    import json

    path = json.dumps(sys.path)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return [subprocess.Popen([sys.executable, "-c", _CHILD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for _ in range(n)]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def render_in_children(chunks: list[tuple], n: int, setup: tuple, progress: Callable[[int], None] | None = None
                       ) -> list[list]:
    """render_batch of every chunk in `n` child processes; the results in the order of `chunks`.
    `setup`: (tokenizer, RenderOptions, TemplateSpec), sent to each child once. `progress(rows)`
    is called in this thread as each chunk comes back, in whatever order they finish."""
    results: list = [None] * len(chunks)
    todo = iter(range(len(chunks)))
    lock = threading.Lock()
    done: queue.Queue = queue.Queue()  # (rows finished, None) or (None, error), from the feeding threads
    # pickled once for all: the tokenizer and its spec are 15 MB, about 1 CPU-second each time
    first = pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL)

    def feed(child: subprocess.Popen) -> None:
        try:
            _send(child.stdin, None, first)
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    break
                _send(child.stdin, chunks[i])
                part = _receive(child.stdout)
                if part is None:
                    raise WorkerDied(child.wait())
                results[i] = part
                done.put((len(part), None))
            child.stdin.close()
        except BrokenPipeError:  # it died before it read all it was sent
            done.put((None, WorkerDied(child.wait())))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            done.put((None, err))

    children = _start(n)
    try:
        threads = [threading.Thread(target=feed, args=(c,), daemon=True) for c in children]
        for t in threads:
            t.start()
        for _ in range(len(chunks)):
            rows, err = done.get()
            if err is not None:
                raise err
            if progress:
                progress(rows)
        for c in children:
            c.wait()
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
    return results
