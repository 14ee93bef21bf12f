"""What the tests share: the real vendored Qwen3 tokenizer, an isolated sftkit cache, the runners of
`sftkit` processes, the reference run and tiny models, and the helpers that read what a run wrote.

Two tiers. tests/*.py is the fast tier: in this process, no `sftkit` process and no launcher
(`make test-fast`; run_cli and start_cli refuse there). tests/process/ starts real processes: the
CLI, launchers, signals, distributed runs. `make test` runs both. A process is forked from a warm
server that has done the imports (tests/warm_cli.py), a launcher's ranks too (tests/warm_rank.py),
unless the test is about what a fresh interpreter does (fresh=True).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROCESS = Path(__file__).resolve().parent / "process"
SAMPLE = "data/sample_alpaca.json"  # 50 Alpaca rows

# A LoRA run of the tiny Qwen3 with a constant learning rate and no warm-up: stopped after any step
# and resumed, it follows the uninterrupted run exactly. Add --data_path (and what differs).
LORA = ["--use_lora", "--per_device_train_batch_size", "2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
        "--learning_rate", "1e-3", "--max_length", "512", "--logging_steps", "1", "--seed", "7"]
# Learning rate 1 with adam_epsilon 1: the update is proportional to the gradient, so float round-off
# is not amplified (plain Adam turns 1e-9 of gradient noise into 1e-6 of weight noise), and rtol 1e-5
# on the weights is meaningful: any mis-weighting of ranks or micro-batches shows.
EXACT = ["--learning_rate", "1", "--adam_epsilon", "1", "--warmup_ratio", "0"]
# `accelerate launch` options for two processes on this CPU
TWO = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# ---- order ----------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """The process tier first: its tests are the long ones, and `make test`'s 2 workers (xdist's
    worksteal: each starts on half of this order and takes from the other's when it runs out) end
    on short ones, whatever ran here before."""
    items.sort(key=lambda item: PROCESS not in item.path.parents)


# ---- fixtures -------------------------------------------------------------------------------------
_test_path: list[Path] = []  # the file of the test being set up or run now


def pytest_runtest_setup(item):  # before its fixtures, of any scope
    _test_path[:] = [item.path]


def _process_tier_only() -> None:
    """The fast tier starts no sftkit process: a test that needs one belongs in tests/process/."""
    if _test_path and PROCESS not in _test_path[0].parents:
        raise AssertionError(f"{_test_path[0].name} is in the fast tier, which starts no sftkit process: "
                             "move the test to tests/process/")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Each test session builds its own tiny-qwen3 and data cache; nothing leaks from ~/.cache."""
    cache = tmp_path_factory.mktemp("sftkit_cache")
    old = {k: os.environ.get(k) for k in ("SFTKIT_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(SFTKIT_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    from sftkit.models import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir())


@pytest.fixture(scope="module")
def own_tok():
    """A tokenizer of the test module's own, whose chat template its tests set (`tok` stays as is)."""
    from transformers import AutoTokenizer

    from sftkit.models import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir())


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family_model(kind, **overrides) -> a tiny random-init model of that architecture on disk
    (tests/family.py), built on first use and shared by the session. Tests copy it before changing
    it. `overrides`: text config values, for a base of another size ({"hidden_size": 96})."""
    import family

    built: dict[tuple, Path] = {}

    def get(kind: str, **overrides) -> Path:
        key = (kind, *sorted(overrides.items()))
        if key not in built:
            name = "_".join([kind, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            built[key] = family.build(kind, tmp_path_factory.mktemp(name), overrides=overrides or None)
        return built[key]

    return get


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once for the whole run: the first xdist worker to ask builds it,
    under a file lock, and the others wait for it and share it (worksteal spreads a module's tests
    over both workers, so a fixture would otherwise be built on each). Its users never change it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / "built_once" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder.parent / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run that stopped and resumed runs are compared with: LORA on the sample rows,
    6 steps, a checkpoint after each (checkpoint-1 ... checkpoint-6), final/ and metrics.jsonl.
    Tests copy it (stopped_at) and never change it."""
    out = tmp_path_factory.mktemp("reference") / "run"  # per worker: tests compare its base with their cache's
    run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "6", "--save_steps", "1", "--output_dir", str(out))
    return out


@pytest.fixture(scope="session")
def eight(tmp_path_factory, tok) -> Path:
    """8 sample examples of uneven length (19 to 103 tokens), prepared once (in this process)."""
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import prepare

    d = tmp_path_factory.mktemp("eight")
    rows = json.loads((ROOT / SAMPLE).read_text())
    rows = sorted(rows, key=lambda r: len(r["output"]) + len(r["instruction"]))[::6][:8]
    (d / "eight.json").write_text(json.dumps(rows))
    prepare(DataOptions(max_length=512), [str(d / "eight.json")], d / "prep", tok)
    return d / "prep"


@pytest.fixture(scope="session")
def four(tmp_path_factory) -> Path:
    """4 Alpaca rows of uneven length, as a raw file (setup prepares it into the test cache)."""
    path = tmp_path_factory.mktemp("four") / "four.json"
    rows = json.loads((ROOT / SAMPLE).read_text())
    path.write_text(json.dumps(sorted(rows, key=lambda r: len(r["output"]))[::5][:4]))
    return path


@pytest.fixture(scope="session")
def other_size(family_model, tmp_path_factory):
    """(narrow, wide, adapter): real tiny Qwen3 bases 64 and 96 wide, and a LoRA adapter (random,
    untrained: only its shapes matter) made on the 64-wide one, which names it as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    narrow, wide = family_model("qwen3"), family_model("qwen3", hidden_size=96)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(narrow),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path_factory.mktemp("other_size") / "adapter"
    model.save_pretrained(adapter)
    return narrow, wide, adapter


@pytest.fixture
def cli(monkeypatch):
    """invoke(*ARGS) -> click Result: `sftkit ARGS` in this process (typer's CliRunner on build_app():
    the console script's parsing and checks, ~10 ms a call instead of a process). Only the tokenizer
    load (~1.5 s) is shared between calls; the tokenizer is read-only in prepare-data."""
    from typer.testing import CliRunner

    import sftkit.models
    from sftkit.cli import build_app

    load = sftkit.models.load_tokenizer  # the real one: monkeypatch undid the last test's patch

    def shared(*args):
        if args not in _TOKENIZERS:
            _TOKENIZERS[args] = load(*args)
        return _TOKENIZERS[args]

    shared("tiny-qwen3", False, None)  # load it outside the runner's captured streams
    monkeypatch.setattr(sftkit.models, "load_tokenizer", shared)
    app, runner = build_app(), CliRunner()
    return lambda *args, **kw: runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)


_TOKENIZERS: dict = {}  # the cli fixture's tokenizers, by load_tokenizer's arguments


# ---- sftkit processes -----------------------------------------------------------------------------
def run_cli(*args: str, launch: list[str] | None = None, env: dict | None = None, check: bool = True,
            timeout: int = 600, cwd: Path = ROOT, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `sftkit ARGS` as a process of its own in `cwd`: forked from a warm server that has done
    the imports (tests/warm_cli.py), or with `fresh` the console script itself, for what a fresh
    interpreter does while importing. `launch`: the real `accelerate launch LAUNCH` starts the ranks:
    the launcher and each rank (RANK_MODULE) forked from the warm server, or with `fresh` the console
    script and each rank `python -m sftkit ARGS`."""
    _process_tier_only()
    if launch is not None:
        cmd = [str(BIN / "accelerate"), "launch", *launch, "-m", "sftkit" if fresh else RANK_MODULE, *args]
    else:
        cmd = [str(BIN / "sftkit"), *args]
    full_env = {**os.environ, **(env or {})}
    if fresh:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    elif launch is not None:  # the console script `accelerate` is this module's main()
        proc = warm_server().run(cmd, rank_env(full_env), cwd, timeout, module="accelerate.commands.accelerate_cli")
    else:
        proc = warm_server().run(cmd, full_env, cwd, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


# `-m warm_rank ARGS` in a launcher's command: each rank is `sftkit ARGS`, forked from the warm
# server; `-m warm_rank --script SCRIPT ARGS`: `python SCRIPT ARGS`
RANK_MODULE = "warm_rank"


def rank_env(env: dict | None = None) -> dict:
    """The environment of a launcher whose ranks run RANK_MODULE: `env` (else this process's) with
    the warm server's socket, and tests/ on the path so that `python -m warm_rank` finds it."""
    _process_tier_only()
    env = dict(os.environ if env is None else env)
    path = [str(ROOT / "tests"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    return {**env, "WARM_CLI_SOCKET": warm_server().listening(), "PYTHONPATH": os.pathsep.join(path)}


def start_cli(*args: str, env: dict | None = None, cwd: Path = ROOT, output: Path | None = None) -> WarmProcess:
    """Start `sftkit ARGS` (forked from the warm server, in a process group of its own) and return
    at once: for a test that signals it or watches it run. `output`: a file that takes its stdout and
    stderr together, as nohup leaves them; else communicate() returns them."""
    _process_tier_only()
    return warm_server().start([str(BIN / "sftkit"), *args], {**os.environ, **(env or {})}, cwd, output)


def start_python(code: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> WarmProcess:
    """Start `python -c CODE ARGS` forked from the warm server (the imports done), and return at
    once: a process of its own, for tests of several processes whose code is not a command."""
    _process_tier_only()
    server = warm_server()
    return server.start([sys.executable, *args], {**os.environ, **(env or {})}, cwd, None, code=code)


def _request(cmd: list, env: dict, cwd: Path, code: str | None = None, module: str | None = None) -> dict:
    """What a process started here would inherit: its arguments (bytes, a non-UTF-8 name, as its
    sys.argv would hold them: decoded with surrogateescape), environment, folder and umask; and what
    it runs in place of `sftkit`: `code` (python -c) or `module` (python -m)."""
    umask = os.umask(0)
    os.umask(umask)
    request = {"args": [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in cmd[1:]], "env": env,
               "cwd": str(cwd), "umask": umask}
    return {**request, **({"code": code} if code is not None else {}), **({"module": module} if module else {})}


class WarmServer:
    """The client of tests/warm_cli.py: one server per test process, started on first use."""

    def __init__(self):
        self.log = tempfile.NamedTemporaryFile(prefix="warm_cli_", suffix=".log", delete=False)  # noqa: SIM115
        self.folder = tempfile.mkdtemp(prefix="warm_cli_")
        self.socket = os.path.join(self.folder, "ranks")  # where launcher ranks (tests/warm_rank.py) connect
        read, write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_cli.py"), str(write), self.socket],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=self.log, stderr=self.log,
                                     pass_fds=(write,), text=True)
        os.close(write)
        self.answers = os.fdopen(read)
        atexit.register(self.close)

    def listening(self) -> str:
        """The socket launcher ranks connect to, once the server has bound it."""
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tests/warm_cli.py did not listen: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.01)
        return self.socket

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"tests/warm_cli.py stopped: {Path(self.log.name).read_text()[-3000:]}")
        return json.loads(line)

    def run(self, cmd: list, env: dict, cwd: Path, timeout: float, module: str | None = None
            ) -> subprocess.CompletedProcess:
        """`cmd` (the sftkit console script's arguments, or with `module` `python -m MODULE`'s) to its end."""
        with tempfile.TemporaryDirectory(prefix="warm_cli_") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            answer = self.ask({**_request(cmd, env, cwd, module=module), "stdout": str(out), "stderr": str(err),
                               "timeout": timeout})
            if answer.get("timeout"):
                raise subprocess.TimeoutExpired(cmd, timeout)
            return subprocess.CompletedProcess(cmd, answer["returncode"], out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def start(self, cmd: list, env: dict, cwd: Path, output: Path | None, code: str | None = None,
              module: str | None = None) -> WarmProcess:
        files = tempfile.TemporaryDirectory(prefix="warm_cli_")  # lives as long as the process object
        out, err = (output, output) if output else (Path(files.name, "stdout"), Path(files.name, "stderr"))
        answer = self.ask({**_request(cmd, env, cwd, code, module), "start": True, "stdout": str(out),
                           "stderr": str(err)})
        return WarmProcess(self, cmd, answer["pid"], out, err, files)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        os.unlink(self.log.name)
        shutil.rmtree(self.folder, ignore_errors=True)


class WarmProcess:
    """A running `sftkit` process started by the warm server: what the tests use of subprocess.Popen
    (pid, returncode, poll, wait, communicate, send_signal, kill), its output read from files."""

    def __init__(self, server: WarmServer, args: list, pid: int, out: Path, err: Path, files):
        self.server, self.args, self.pid, self.out, self.err, self.files = server, args, pid, out, err, files
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.ask({"poll": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            answer = self.server.ask({"wait": self.pid, "timeout": 3600 if timeout is None else timeout})
            if answer.get("timeout"):
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = answer["returncode"]
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once it has ended; with `output`, both are that file's text."""
        self.wait(timeout)
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # ended and reaped by a wait that timed out
                os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


_SERVER: list[WarmServer] = []  # this test process's server, once started


def warm_server() -> WarmServer:
    if not _SERVER:
        _SERVER.append(WarmServer())
    return _SERVER[0]


def free_port() -> str:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ---- what a command said and a run wrote ----------------------------------------------------------
def one_error(result, *fragments: str, alone: bool = False) -> str:
    """The one `error: ` line of a command that failed as sftkit fails: exit 2, no traceback, that line
    the last of stderr (with `alone`: the only line printed at all), each fragment in it. `result`: a
    subprocess.CompletedProcess or a click Result. (Only the error line is asserted by default: a
    library may print a line of its own first, as bitsandbytes does where `kernels` is missing.)"""
    code = result.returncode if hasattr(result, "returncode") else result.exit_code
    err, out = result.stderr or "", result.stdout or ""
    said = err + out
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 2, (code, said[-3000:])
    assert "Traceback" not in said, said[-3000:]
    assert len(errors) == 1, said[-3000:]
    assert err.strip().splitlines()[-1] == errors[0], err[-3000:]
    if alone:
        assert [x for x in said.splitlines() if x.strip()] == errors, said[-3000:]
    assert all(f in errors[0] for f in fragments), errors[0]
    return errors[0]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def predicted_peak_holds(out_dir: Path, tolerance: float = 0.15) -> dict:
    """A run's predicted peak memory (metrics.jsonl's start line, sftkit/plan.py) is within `tolerance`
    of the peak resident memory its largest rank reached (the end line). Only a fresh process's
    memory says this: one forked from the warm server shares the server's pages and free heap."""
    lines = read_metrics(out_dir)
    forecast = next(r for r in lines if r.get("event") == "start")["memory_forecast"]
    end = next(r for r in lines if r.get("event") == "end")
    measured = max(end["peak_rss_mb_per_rank"])
    assert end["predicted_peak_mb"] == forecast["peak_mb"]
    assert abs(forecast["peak_mb"] / measured - 1) <= tolerance, (forecast, measured)
    return forecast


def steps(out_dir: Path) -> list[dict]:
    """The records of a run's optimizer steps (those with a loss), from its metrics.jsonl."""
    return [r for r in read_metrics(out_dir) if "loss" in r]


def losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss, from a run's metrics.jsonl (a step logged twice, as a resumed copy may
    hold it: the later line)."""
    return {r["step"]: r["loss"] for r in steps(out_dir)}


def final_weights(out_dir: Path) -> dict:
    """The tensors of a run's final/: its adapter, or the whole model."""
    from safetensors.torch import load_file

    adapter = out_dir / "final" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else out_dir / "final" / "model.safetensors"))


def stopped_at(run: Path, dest: Path, step: int, keep: tuple[int, ...] | None = None) -> Path:
    """A copy of the run folder `run` as a run stopped after `step` left it: its checkpoints up to
    that step (or only those of the steps in `keep`), the metrics of those steps, no final/."""
    def left_out(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != run:
            return set()
        at = {n: int(n.split("-")[1]) for n in names if n.startswith("checkpoint-")}
        return {"final"} | {n for n, s in at.items() if s > step or (keep is not None and s not in keep)}

    shutil.copytree(run, dest, ignore=left_out)
    kept = [x for x in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(x).get("step", 0) <= step
            and json.loads(x).get("event") != "end"]
    (dest / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return dest


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def chat_rows(folder: Path) -> Path:
    """folder/d.jsonl: 8 short conversations in the messages format."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    return write_jsonl(folder / "d.jsonl", rows)


def make_older(ckpt: Path, version: int, scheduler_pickle: bytes | None = None) -> None:
    """Turn a checkpoint into a layout sftkit wrote before: no checksums.json and the scheduler in
    accelerate's custom_checkpoint_0.pkl (`scheduler_pickle`, else its state as plain data); version
    2 without the run identity, version 1 without even "version" and "skipped_steps"."""
    import torch

    state = json.loads((ckpt / "trainer_state.json").read_text())
    if version == 1:
        old = {k: state[k] for k in ("step", "micro_index", "tokens", "supervised_tokens", "elapsed_s")}
    else:
        old = {k: v for k, v in state.items() if k not in ("total_steps", "run_id", "data_fingerprint")}
        old["version"] = 2
    (ckpt / "trainer_state.json").write_text(json.dumps(old))
    (ckpt / "checksums.json").unlink()
    target = ckpt / "state" / "custom_checkpoint_0.pkl"
    if scheduler_pickle is None:
        torch.save(json.loads((ckpt / "scheduler.json").read_text()), target)
    else:
        target.write_bytes(scheduler_pickle)
    (ckpt / "scheduler.json").unlink()


# Runs a command and prints its exit code and peak RSS (KB). A child's ru_maxrss counts the memory of
# the process it was forked from, and pytest's holds ~800 MB by then: forked from this small
# interpreter instead, the command's own peak is what is read.
_MEASURE = """import os, sys, time
start = time.time()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.time() - start)
"""


def measured(cmd: list[str], cwd: Path = ROOT) -> tuple[int, str, float, float]:
    """(exit code, stderr, wall seconds, peak RSS in MB) of `cmd`, its stdout and stderr kept apart."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=True)
    code, peak_kb, wall = proc.stdout.splitlines()[-1].split()
    return int(code), proc.stderr, float(wall), int(peak_kb) / 1024


def loss_and_grads(model, batches, head=None, bf16: bool = False) -> tuple[float, dict]:
    """The summed token loss of `batches` (one micro-batch or a list of them) through `model` on its
    device, bf16 autocast or not, and the gradient of that sum: (loss, {name: grad}) of every
    parameter that got one."""
    import torch

    from sftkit.loss import token_loss_sum

    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches if isinstance(batches, list) else [batches]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = token_loss_sum(model, batch if device.type == "cpu" else batch.to(device), head)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (created here) with these mount options (e.g. "size=18M"),
    unmounted afterwards; the test is skipped where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
