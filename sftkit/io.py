"""Where sftkit keeps its caches, and writes that never leave a half-written file or directory
behind: temp path, then rename."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sftkit.errors import ConfigError


def cache_dir() -> Path:
    """Built models and prepared sets: $SFTKIT_CACHE, default ~/.cache/sftkit."""
    return Path(os.environ.get("SFTKIT_CACHE", Path.home() / ".cache" / "sftkit"))


def check_cache_writable(entry: Path) -> None:
    """A cache entry about to be built can be written, or one line says how to move the cache."""
    check_writable(entry, "the cache folder", "set SFTKIT_CACHE to a folder you can write to")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def check_not_an_input(out: Path, inputs: list, flag: str = "--output_dir") -> None:
    """Refuse an output that is, holds, or lies inside one of the command's inputs: writing it
    would overwrite, delete or change what is being read."""
    check_path(out, flag)
    for spec in inputs:
        if spec is not None:
            check_path(spec, "input")
    target = out.resolve()
    for item in [path for spec in inputs if spec is not None for path in _on_disk(str(spec))]:
        source = Path(item).resolve()
        if target == source or source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
            raise ConfigError(f"{flag} {out} would overwrite an input ({item}): the output may not be, hold or lie "
                              f"inside it; choose another {flag}")


def _on_disk(spec: str) -> list[str]:
    """The paths an input names: itself, every file a glob matches (`proj/*.json`: an output must
    not be any of them either), nothing for a Hub id."""
    if Path(spec).exists():
        return [spec]
    return glob.glob(spec, recursive=True) if glob.has_magic(spec) else []


NAME_MAX = 255  # bytes in one path component on Linux file systems (ext4, xfs, tmpfs)


def check_path(path, what: str = "--output_dir") -> None:
    """A path that can be used and said: each name valid UTF-8 and at most NAME_MAX bytes, and no
    symlink loop. Each would otherwise be a traceback (UnicodeEncodeError, OSError, RuntimeError)
    wherever the path is first used."""
    text = str(path)
    shown = os.fsencode(text).decode("utf-8", "backslashreplace")
    if shown != text:
        raise ConfigError(f"{what} {shown}: the name is not valid UTF-8 (a byte of another encoding, such as "
                          "Latin-1); rename it")
    for part in Path(text).parts:
        if len(part.encode()) > NAME_MAX:
            raise ConfigError(f"{what} {text[:80]}…: the name {part[:40]}… is {len(part.encode())} bytes long, "
                              f"and a file system takes at most {NAME_MAX}; choose a shorter name")
    try:
        Path(text).resolve()
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"{what} {text}: cannot be resolved ({getattr(err, 'strerror', None) or err}); choose "
                          "another path") from None


def check_not_a_file(out: Path, flag: str = "--output_dir") -> None:
    check_path(out, flag)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; pass a directory (it is created if missing)")


def _nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest parent that does: where it would be created."""
    place = Path(path).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    return place


def check_writable(path: Path, what: str = "--output_dir", fix: str = "choose a folder you can write to") -> None:
    """`path` (created later if missing) can be written: a temporary file is made and removed in
    it, or in its nearest existing parent. A read-only file system or a folder without write
    permission is then one line here, before any model loads, not a traceback at the first save."""
    path = Path(path).absolute()
    place = _nearest_existing(path)
    if not place.is_dir():
        raise ConfigError(f"{what} {path}: {place} is a file, so no folder can be made there; choose another place")
    try:
        fd, probe = tempfile.mkstemp(dir=place, prefix=".sftkit-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write in {place} ({err.strerror or err}); {fix}") from None


def check_free_space(path: Path, need: int, what: str = "--output_dir") -> None:
    """At least `need` bytes free where `path` will be written (a lower bound of what the command
    writes there, so a refusal is certain to be right); 0 checks nothing."""
    if need <= 0:
        return
    free = shutil.disk_usage(_nearest_existing(path)).free
    if free < need:
        raise ConfigError(f"{what} {path}: {_size(free)} free on its file system, and what is written there needs "
                          f"at least {_size(need)}; free some space or choose another place")


def free_bytes(path: Path) -> int:
    """Bytes free on the file system where `path` is (or would be created)."""
    return shutil.disk_usage(_nearest_existing(path)).free


def disk_full(err: BaseException) -> bool:
    """A full disk or quota, however the writer reported it: OSError ENOSPC/EDQUOT, or the same
    text inside safetensors' SafetensorError or torch's RuntimeError."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_free_output(out: Path, overwrite: bool, flag: str = "--output_dir") -> None:
    """An existing file or a non-empty folder is someone's data: refused unless overwrite."""
    check_not_a_file(out, flag)
    check_writable(out, flag)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {out} is not empty; choose a new folder, or pass --overwrite_output_dir to "
                          "replace its contents")


def apply_umask(tree: Path) -> None:
    """Give every file and folder under `tree` the mode a plain open()/mkdir would (0644/0755
    under umask 022). Libraries that write through temporary files (safetensors weights, our own
    atomic writes) leave 0600/0700, which a serving process running as another user cannot read."""
    mask = _umask()
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the file gets the mode open() would give it (0644 under umask 022)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _host_tag() -> str:
    """This host, hashed: a temporary folder's name may hold no dots."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _writer_tag() -> str:
    """Who writes a temporary folder: this host and process."""
    return f"sftkit-{_host_tag()}-{os.getpid()}"


_TMP_NAME = re.compile(r"\.sftkit-([0-9a-f]{8})-(\d+)-[^.]*\.tmp$")


def remove_stale_tmp(parent: Path) -> list[Path]:
    """Remove the temporary folders in `parent` whose writer, a process on this host, is gone
    (killed mid-write: nothing else would ever clean them). Returns what was removed."""
    here = _host_tag()
    removed = []
    for path in parent.glob(".*.tmp") if parent.is_dir() else []:
        found = _TMP_NAME.search(path.name)
        if found and found.group(1) == here and not _alive(int(found.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_directory(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `final` in one rename.

    replace=True: an existing `final` (this command's own earlier output) is replaced.
    replace=False, for content-addressed cache entries that several processes may build at once:
    the first complete writer wins, a later one discards its copy, and a finished directory is
    never moved while another process may be reading it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{_writer_tag()}-", suffix=".tmp"))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp made it 0700
        if not replace:
            try:
                os.rename(tmp, final)  # fails when another writer's complete copy is there
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():
            old = final.with_name(f".{final.name}.{_writer_tag()}-old.tmp")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A run file holds about 80 options; YAML aliases can make a few hundred bytes expand to 10^9
# values (9 levels of 10), which printing or copying then multiplies: refused above this.
YAML_MAX_VALUES = 100_000


def read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, refusing documents whose aliases expand beyond YAML_MAX_VALUES
    values (counted on the node graph before anything is built) and naming the line of a syntax
    error; every failure is one ConfigError."""
    import yaml

    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        _check_unique_keys(path, node, set())
        if node is not None and _expanded_size(node, {}) > YAML_MAX_VALUES:
            raise ConfigError(f"{path}: its aliases (*name) expand to more than {YAML_MAX_VALUES:,} values; a run "
                              "file needs no aliases this large: write the options out")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a run file") from None
    finally:
        loader.dispose()


def _check_unique_keys(path: Path, node, seen: set[int]) -> None:
    """No mapping gives a key twice: yaml.safe_load keeps the last silently, so the value on an
    early line would be read and ignored."""
    import yaml

    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in lines:
                raise ConfigError(f"{path}:{key.start_mark.line + 1}: key '{key.value}' is given twice (lines "
                                  f"{lines[key.value]} and {key.start_mark.line + 1}); keep one")
            if isinstance(key, yaml.ScalarNode):
                lines[key.value] = key.start_mark.line + 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in item if isinstance(item, tuple) else (item,):
                _check_unique_keys(path, child, seen)


def _expanded_size(node, seen: dict[int, int]) -> int:
    """Values the node stands for once every alias is expanded; each distinct node is counted once
    (`seen`), so a bomb costs its size in bytes, not in expanded values."""
    if id(node) in seen:
        return seen[id(node)]
    size = 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in item if isinstance(item, tuple) else (item,):  # a mapping's (key, value) pairs
                size += _expanded_size(child, seen)
                if size > YAML_MAX_VALUES:
                    break
    seen[id(node)] = size
    return size
