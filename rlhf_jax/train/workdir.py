"""Guarding a stage's directory: one writer at a time, no stale temporaries, no silent reuse.

- `workdir_lock(workdir)`: an exclusive lock file `workdir/.lock` (JSON: pid, host, the process's
  start time), created atomically with `O_CREAT | O_EXCL`.  A second writer gets a `WorkdirError`
  naming the holder; a lock whose process is gone (same host, pid not running, or running but
  started later: a reused pid) is taken over with a warning.  A lock held on another host cannot
  be checked and is never taken over.  Re-entrant within a process (a stage holds it around
  `run_loop`, which takes it too).  Only process 0 of a multi-host run locks.
- On first acquisition, `clean_orphans` removes what interrupted runs leave behind: exports'
  `model.tmp-<pid>/` and `model.old-<pid>/`, `*.tmp` files of atomic JSON writes, orbax's
  `checkpoints/*.orbax-checkpoint-tmp*` and the checkpointer's write probes.  Holding the lock
  is what makes this safe: no other process writes here.
- `fingerprint(config, inputs)`: what defines a run's result, the config (operational fields
  already removed by the caller) plus the content (SHA-256) of its input files and directories.
  The fingerprint of the run that owns the workdir is kept in `workdir/fingerprint.json`;
  `fingerprint_changes(old, new)` lists the differences in words, for `WorkdirError` messages.
  Hashing is skipped for an input whose path, size and modification time equal the recorded
  ones (the recorded hash is reused), so a re-run reads its inputs again only when they moved
  or changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax

from rlhf_jax.errors import WorkdirError

__all__ = [
    "LOCK_FILE",
    "WorkdirError",
    "clean_orphans",
    "describe_changes",
    "fingerprint",
    "fingerprint_changes",
    "workdir_lock",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------ the lock


@dataclasses.dataclass
class _Held:
    count: int
    created_dir: bool


_HELD: dict[Path, _Held] = {}  # workdirs this process holds, with their re-entry count


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold `workdir/.lock` for the block (creating `workdir` if needed); yields the workdir.

    Raises:
      WorkdirError: another live process holds the lock (on this host, or on another host, which
        cannot be checked), naming its pid and host; or the workdir or its lock cannot be created
        (e.g. a read-only file system).
    """
    path = Path(workdir).absolute()
    if jax.process_index() != 0:
        yield path
        return
    held = _HELD.get(path)
    if held is not None:
        held.count += 1
        try:
            yield path
        finally:
            held.count -= 1
        return
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        _acquire(path / LOCK_FILE)
    except OSError as e:
        raise WorkdirError(f"cannot use {path} as a workdir: {e.strerror or e}") from e
    _HELD[path] = _Held(1, created)
    try:
        clean_orphans(path)
        yield path
    finally:
        del _HELD[path]
        _release(path / LOCK_FILE)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # nothing was written: leave no empty directory behind


def _acquire(lock: Path) -> None:
    mine = _lock_record()
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:  # being written this instant, or torn: treat as held
                raise WorkdirError(f"{lock.parent} is locked ({lock} exists but is unreadable); if no "
                                   f"other process uses this workdir, delete {lock}") from None
            if _holder_alive(holder):
                raise WorkdirError(
                    f"{lock.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(lock file {lock}); wait for it to finish or use another workdir"
                    + ("" if holder.get("host") == mine["host"] else
                       f"; if that process is gone, delete {lock}")
                ) from None
            log.warning("taking over %s: its process (pid %s on %s) is no longer running",
                        lock, holder.get("pid"), holder.get("host"))
            if _read_lock(lock) == holder:  # not replaced by a racing process meanwhile
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        return
    raise WorkdirError(f"{lock.parent}: another process took the stale lock {lock} first")


def _release(lock: Path) -> None:
    if _read_lock(lock) == _lock_record():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _lock_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _holder_alive(holder: Mapping[str, Any]) -> bool:
    """False only when the holder is surely gone: same host, and its pid is not running (or is
    a zombie, or belongs to a process started after the lock's)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    return _pid_alive(holder["pid"], holder.get("start"))


def _pid_alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat (Linux), else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


# ----------------------------------------------------------------------------------- orphans


def clean_orphans(workdir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted runs left in `workdir`; returns the removed paths.

    Only call it holding `workdir_lock` (anything temporary then belongs to a dead run).
    Checkpoints moved aside (`<step>.corrupt`, `<step>.incomplete-*`) are kept.
    """
    workdir = Path(workdir)
    found = [p for p in workdir.glob("model.tmp-*") if p.is_dir()]
    found += [p for p in workdir.glob("model.old-*") if p.is_dir()]
    found += [p for p in workdir.glob("*.tmp") if p.is_file()]
    ckpts = workdir / "checkpoints"
    found += [p for p in ckpts.glob("*.orbax-checkpoint-tmp*")]
    found += [p for p in ckpts.glob(".write-probe-*")]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if found:
        log.warning("removed %d temporary item(s) left by an interrupted run in %s: %s", len(found), workdir,
                    ", ".join(str(p.relative_to(workdir)) for p in found))
    return found


# ------------------------------------------------------------------------------ fingerprints


def fingerprint(
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike | None],
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`{"config": config, "inputs": {name: entry}}`: a run's identity.

    `config` is JSON-able (the caller drops fields that do not change the result). `inputs` maps
    a name (the config key, e.g. `"train_data"`) to a file or directory, or None; its entry is
    None, `{"path", "missing": true}`, or `{"path", "size", "mtime_ns", "files", "sha256"}` where
    a directory's size/mtime/files are the total, the newest and the count of its files and its
    SHA-256 covers every file's relative path and content.  An input of `previous` (an earlier
    fingerprint) with the same path, size, mtime and file count lends its hash unread.
    """
    old = (previous or {}).get("inputs") or {}
    return {
        "config": json.loads(json.dumps(config)),
        "inputs": {name: _input_entry(path, old.get(name)) for name, path in inputs.items()},
    }


def _input_entry(path: str | os.PathLike | None, old: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if path is None:
        return None
    path = Path(path).absolute()
    if not path.exists():
        return {"path": str(path), "missing": True}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    entry = {
        "path": str(path),
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
        "files": len(files),
    }
    if old and all(old.get(k) == v for k, v in entry.items()) and isinstance(old.get("sha256"), str):
        return {**entry, "sha256": old["sha256"]}
    if path.is_dir():
        total = hashlib.sha256()
        for f, s in zip(files, stats):
            total.update(f"{f.relative_to(path).as_posix()}\0{s.st_size}\0{_sha256(f)}\n".encode())
        digest = total.hexdigest()
    else:
        digest = _sha256(path)
    return {**entry, "sha256": digest}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs from `old` to `new`, one phrase per config key or input, e.g.
    `"optimizer.lr 0.001 -> 0.002"`, `"train_data (/data/demos.jsonl) content changed"`.
    An input that only moved (same content, new path) is no change."""
    changes = []
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    for key in sorted(set(a) | set(b)):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            changes.append(f"{key} {_show(a.get(key, _ABSENT))} -> {_show(b.get(key, _ABSENT))}")
    ia, ib = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(ia) | set(ib)):
        x, y = ia.get(name), ib.get(name)
        if _content(x) == _content(y):
            continue
        if x is None or y is None:
            changes.append(f"{name} {_where(x)} -> {_where(y)}")
        elif y.get("missing"):
            changes.append(f"{name} ({y['path']}) is missing")
        else:
            changes.append(f"{name} ({y['path']}) content changed")
    return changes


def describe_changes(changes: list[str], limit: int = 4) -> str:
    """`changes` joined with "; ", at most `limit` of them (then "and N more")."""
    shown = "; ".join(changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


_ABSENT = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _show(value: Any) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value)


def _content(entry: Mapping[str, Any] | None) -> Any:
    if entry is None:
        return None
    return "missing" if entry.get("missing") else entry.get("sha256")


def _where(entry: Mapping[str, Any] | None) -> str:
    return "none" if entry is None else entry["path"]
