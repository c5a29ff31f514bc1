"""The run directory: writable, owned by one process, and keeping each invocation's command.

One owner per run directory: a fresh run never replaces a finished one, and two processes never write one.

- `check_fresh`: a run directory that already holds a run (checkpoints or an export) is refused for a fresh
  start, naming the three ways on: `ckpt_path=last` (continue it), another `hydra.run.dir`, or `overwrite=true`.
- `RunLock`: `RUN_DIR/.lock`, held with `flock` for the life of the process and holding "pid host time". The
  kernel releases the lock when its process dies, however it dies, so a lock left by a dead process is taken
  over at once and safely (two newcomers cannot both take it: only one `flock` succeeds).
- `remove_stale_temp_files`: the temp files of atomic writes that a killed process left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from sae.errors import UserError

log = logging.getLogger("sae")


# Module-global: an OmegaConf resolver has nowhere else to keep an answer, and it must not change once Hydra
# has written .hydra/overrides.yaml within the same process.
_RECORD_DIRS: dict[str, str] = {}


def run_record_dir(output_dir: str) -> str:
    """Where Hydra records this invocation's command (`hydra.output_subdir`): `.hydra` for the run's first
    process, `.hydra/resume-N` for each later one (a resume, a requeued job), so that the original command is
    never overwritten. Decided once per directory and process."""
    if output_dir not in _RECORD_DIRS:
        base = Path(output_dir) / ".hydra"
        n = 1
        while (base / f"resume-{n}").exists():
            n += 1
        _RECORD_DIRS[output_dir] = f".hydra/resume-{n}" if (base / "overrides.yaml").exists() else ".hydra"
    return _RECORD_DIRS[output_dir]


OmegaConf.register_new_resolver("run_record_dir", run_record_dir, replace=True)


class OutputDirError(UserError, OSError):
    """The run directory cannot be written."""


def check_writable(directory: str | Path) -> Path:
    """Create `directory` and prove it is writable before any expensive work starts."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: DDP ranks probe the same directory
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"cannot write to the run directory {str(path)!r} ({e.strerror or e}). "
            "Choose a writable place with hydra.run.dir=DIR (or hydra.sweep.dir=DIR for -m)."
        ) from e
    return path

LOCK_NAME = ".lock"
# What a previous run leaves behind; an export or a checkpoint means the directory holds a run.
RUN_MARKERS = ("sae.safetensors", "sae.json", "checkpoints/*.ckpt", "members/*/sae.safetensors")
# What overwrite=true removes before the new run starts (its history must not mix with the new one's).
OVERWRITTEN = ("checkpoints", "sae.safetensors", "sae.json", "members", "csv", "tensorboard", "wandb-fallback",
               "wandb_id.txt", "eval")


class RunDirBusyError(OutputDirError):
    """The run directory holds another run, or another process is writing it."""


def holds_run(directory: Path) -> list[Path]:
    """The files that show `directory` already holds a run (empty if none)."""
    return sorted(p for pattern in RUN_MARKERS for p in directory.glob(pattern))


def check_fresh(directory: Path, overwrite: bool) -> None:
    """Refuse a fresh run in a directory holding a run, unless `overwrite`: then clear the old run's files."""
    found = holds_run(directory)
    if not found:
        return
    if not overwrite:
        raise RunDirBusyError(
            f"{directory} already holds a run ({found[0].relative_to(directory)}); a new run would replace it. "
            f"Continue it with ckpt_path=last hydra.run.dir={directory}, start in another directory (a new "
            "hydra.run.dir), or replace it with overwrite=true."
        )
    for name in OVERWRITTEN:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("overwrite=true: removed the previous run's checkpoints, export and logs from %s", directory)


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock, which records the holder's pid and host (see the module doc)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirBusyError(
                f"{self.path.parent} is being written by another process ({holder or 'pid unknown'}); two runs "
                "must not share a directory. Wait for it to finish, or use another hydra.run.dir."
            ) from None
        previous = _read(fd)
        if previous:
            log.info("took over the lock of %s (its process, %s, has ended)", self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove the temp files (`.NAME.*.tmp`) that interrupted atomic writes left in the run directory, its
    checkpoints/ and members/*. Called while holding the run's lock, so no live writer owns them."""
    removed = []
    for pattern in (".*.tmp", "checkpoints/.*.tmp", "members/*/.*.tmp"):
        for path in directory.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                log.info("removed %s, left by a write that was interrupted", path.relative_to(directory))
    return removed


def _forget_record(out_dir: Path) -> None:
    """Remove this refused process's `.hydra/resume-N` record (Hydra wrote it before train.py could refuse)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        subdir = HydraConfig.get().output_subdir
    except Exception:  # noqa: BLE001 - not under Hydra (tests composing a config): nothing was recorded
        return
    if subdir and str(subdir).startswith(".hydra/resume-"):
        shutil.rmtree(out_dir / str(subdir), ignore_errors=True)


def take_ownership(out_dir: Path, ckpt_path: Path | None, overwrite: bool) -> RunLock | None:
    """Rank zero locks the run directory, tidies interrupted writes, and refuses to replace another run."""
    if rank_zero_only.rank != 0:
        return None  # the DDP processes rank zero launched share its directory and its lock
    try:
        lock = RunLock(out_dir).acquire()
    except RunDirBusyError:
        _forget_record(out_dir)
        raise
    try:
        remove_stale_temp_files(out_dir)
        continues_here = ckpt_path is not None and out_dir.resolve() in ckpt_path.resolve().parents
        if not continues_here:
            check_fresh(out_dir, overwrite)
    except BaseException:
        lock.release()
        _forget_record(out_dir)
        raise
    return lock
