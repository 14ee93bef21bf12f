"""A launcher's rank, warm: `accelerate launch ... -m warm_rank ARGS` (or torchrun) starts this in each
rank's place. It hands its arguments, environment (RANK, WORLD_SIZE, MASTER_ADDR, what accelerate
set), folder and umask, with its stdout and stderr, to the test process's warm server
(tests/warm_cli.py, the socket in $WARM_CLI_SOCKET), which forks `sftkit ARGS` with them (with
`--script SCRIPT ARGS`: `python SCRIPT ARGS`; with `--module MODULE ARGS`: `python -m MODULE ARGS`,
which is how the benchmarks' child processes come here, bench/child.py's BENCH_PYTHON): the rank
runs that code with the imports already done. This process stands in for it: it passes the launcher's signals on to the rank's process
group and exits as the rank did.

Imports nothing heavy: it starts in tens of milliseconds where a rank importing torch takes ~5 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def main() -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["WARM_CLI_SOCKET"])
    umask = os.umask(0)
    os.umask(umask)
    request = {"args": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}
    if sys.argv[1:2] == ["--script"]:  # `python SCRIPT ARGS` in the rank's place
        request.update(script=os.path.abspath(sys.argv[2]), args=sys.argv[3:])
    elif sys.argv[1:2] == ["--module"]:  # `python -m MODULE ARGS`
        request.update(module=sys.argv[2], args=sys.argv[3:])
    sys.stdout.flush()
    socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [1, 2])
    answers = conn.makefile()
    pid = json.loads(answers.readline())["pid"]

    def forward(sig, _frame):
        try:
            os.killpg(pid, sig)  # the rank and its data workers, as a launcher's kill of a session reaches them
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    line = answers.readline()
    code = json.loads(line)["returncode"] if line else 1
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
