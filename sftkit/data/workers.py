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

import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator

from sftkit.data.columns import Columns
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
    one render_batch result out for each (as columns: sftkit.data.columns.from_rendered), until its stdin closes."""
    from sftkit.data.columns import from_rendered
    from sftkit.data.render import encode, render_pieces

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
            rendered = render_pieces(convs, tokenizer, spec, opts, tools, switches)
            _send(replies, from_rendered(rendered, encode(spec, rendered.texts)))
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


def render_in_children(tasks: Iterable[tuple], n: int, setup: tuple, ahead: int = 2) -> Iterator[Columns]:
    """render_batch of each task (convs, tools, switches) in `n` child processes, as columns, in
    the order of `tasks`. Tasks are taken as children are free, at most `ahead` a child beyond the
    result the caller waits for, so memory holds a few chunks whatever the number of rows.
    `setup`: (tokenizer, RenderOptions, TemplateSpec), sent to each child once. An error raised
    while a task is taken (a bad row in the reading behind `tasks`) is raised here."""
    results: dict[int, Columns] = {}
    errors: list[BaseException] = []
    stop = threading.Event()  # the caller is gone: the feeding threads end
    ended = [0]  # children whose feeding thread is done
    ready = threading.Condition()
    taking = threading.Lock()  # `tasks` is one iterator: one thread takes from it at a time
    todo = enumerate(tasks)
    slots = threading.Semaphore(ahead * n)
    # pickled once for all: the tokenizer and its spec are 15 MB, about 1 CPU-second each time
    first = pickle.dumps(setup, protocol=pickle.HIGHEST_PROTOCOL)

    def feed(child: subprocess.Popen) -> None:
        try:
            _send(child.stdin, None, first)
            while True:
                slots.acquire()
                if stop.is_set() or errors:
                    break
                with taking:
                    item = next(todo, None)
                if item is None:
                    break
                i, task = item
                _send(child.stdin, task)
                part = _receive(child.stdout)
                if part is None:
                    raise WorkerDied(child.wait())
                with ready:
                    results[i] = part
                    ready.notify_all()
            child.stdin.close()
        except BrokenPipeError:  # it died before it read all it was sent
            errors.append(WorkerDied(child.wait()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, which raises it
            errors.append(err)
        finally:
            with ready:
                ended[0] += 1
                ready.notify_all()

    children = _start(n)
    try:
        for c in children:
            threading.Thread(target=feed, args=(c,), daemon=True).start()
        for i in itertools.count():
            with ready:
                while i not in results and not errors and ended[0] < n:
                    ready.wait()
                if errors:
                    raise errors[0]
                if i not in results:  # every child is done and nothing is left
                    break
                part = results.pop(i)
            slots.release()
            yield part
        for c in children:
            c.wait()
    finally:
        stop.set()
        for _ in range(n):  # a feeding thread waiting for a slot wakes, and sees the stop
            slots.release()
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
