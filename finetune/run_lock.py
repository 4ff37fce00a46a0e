"""One run per run directory: an exclusive lock on `<run_dir>/.finetune.lock` for the whole run.

The process that owns a run (rank 0; the ranks `trainer.nproc` spawns run inside it) takes an
`fcntl.flock` on the lock file and holds it until `run()` returns or raises; the kernel drops it when
the process dies, SIGKILL included, so a lock file left by a killed run is free, not stale. The file
records its holder (pid, host, start time) and the `.hydra/` files the holder's Hydra wrote, so that:

- a second process on the same directory stops with one message naming the holder, and puts back the
  holder's `.hydra/` files that its own Hydra overwrote before `run()` started: it leaves the
  directory as it found it;
- an attempt that stops before it wrote any report (a refused resume, a completed run, a bad
  override) puts back the `.hydra/` files and the record of the run whose reports are there;
- the digest of `.hydra/config.yaml` as the run was started (`config_sha256`) is at hand for the
  weights' metadata, which commands that rebuild from the directory check it against.

Under the lock, temporary files that a killed atomic write left (`.NAME.XXXXXXXX.tmp`, see
`state.atomic_path`) are removed, and the removal is logged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError, RunDirError

log = logging.getLogger(__name__)

LOCK = ".finetune.lock"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# What a run writes once it has started for real: while none of these changed, the directory still
# holds the run it held before, and an attempt that stops there puts everything back.
RESULT_FILES = ("summary.json", "load_report.json", "trainability.json", "metrics.csv", "model.safetensors",
                "checkpoints/last.pt", "checkpoints/best.safetensors")
# state.atomic_path's temp files: mkstemp(prefix=".NAME.", suffix=".tmp") adds 8 characters.
ORPHAN_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_BUSY_READ_TRIES = 20  # the holder writes its record right after taking the lock: wait ~1 s for it


@dataclass
class Holder:
    """The lock file's record: who holds (or last held) the directory, and its `.hydra/` files."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None  # local time, ISO 8601
    argv: list[str] = field(default_factory=list)
    hydra: dict[str, str] = field(default_factory=dict)  # file name -> text, as the holder's Hydra wrote it
    config_sha256: str | None = None  # of hydra["config.yaml"]
    ended: str | None = None  # set when the holder released the lock; None while held, or if it was killed

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            fields = json.loads(data.decode())
            return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    def describe(self) -> str:
        if self.pid is None:
            return "a process that recorded nothing"
        host = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"pid {self.pid}{host}, started {self.started}"


def read_record(run_dir: Path) -> Holder | None:
    """The lock file's record (None when there is none or it cannot be read)."""
    try:
        return Holder.parse((Path(run_dir) / LOCK).read_bytes())
    except OSError:
        return None


def config_sha256(run_dir: Path) -> str | None:
    """The sha256 of `.hydra/config.yaml` as the run holding (or last holding) `run_dir` started."""
    record = read_record(run_dir)
    return record.config_sha256 if record else None


@contextmanager
def hold_run_dir(run_dir: Path, world, cfg=None):
    """Hold `run_dir` for the length of the block (rank 0 only; other ranks learn whether it could).
    `cfg`: the run's config, as Hydra saved it into `.hydra/config.yaml`.

    An error that ends the block before the run wrote anything of its own (a refusal, a bad config)
    is marked `run_dir_untouched = True`: whoever reports it must not write into the directory either
    (it holds another run's files, or none)."""
    lock, refusal = None, None
    if world.is_main:
        try:
            lock = RunDirLock.acquire(Path(run_dir), cfg)
        except RunDirError as exc:
            refusal = exc
    if world.is_distributed and world.any(refusal is not None) and refusal is None:
        refusal = RunDirError(f"rank 0 could not take the run directory {run_dir}.", "see rank 0's message")
    if refusal is not None:
        refusal.run_dir_untouched = True
        raise refusal
    try:
        yield lock
    except BaseException as exc:
        if lock is not None and not lock.started():
            try:
                exc.run_dir_untouched = True
            except AttributeError:  # an exception type that takes no attributes
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


class RunDirLock:
    """The held lock: the open, flocked lock file and what to put back if this attempt never started."""

    def __init__(self, run_dir: Path, fd: int, created_file: bool, created_dir: bool, previous: bytes,
                 hydra_writer: Path | None):
        self.run_dir, self.fd = run_dir, fd
        self.created_file, self.created_dir = created_file, created_dir
        self.previous = previous  # the lock file's bytes before this process took it
        self.record = Holder()
        self.hydra_writer = hydra_writer  # the .hydra dir this process's Hydra wrote, else None
        self.results_before = result_stamps(run_dir)

    @classmethod
    def acquire(cls, run_dir: Path, cfg=None) -> "RunDirLock":
        try:
            created_dir = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}.",
                              "choose a writable hydra.run.dir") from exc
        hydra_dir, hydra_files = hydra_written_here(run_dir, cfg)
        fd, created_file = _lock(run_dir / LOCK, run_dir, hydra_dir)
        lock = None
        try:
            lock = cls(run_dir, fd, created_file, created_dir, _read_fd(fd), hydra_dir)
            if hydra_dir is None:  # not started by Hydra here: record the .hydra/ files as they are
                hydra_files = {name: text for name in HYDRA_FILES
                               if (text := _read_text(run_dir / ".hydra" / name)) is not None}
            lock.take(hydra_files)
            return lock
        except BaseException as exc:
            if lock is not None:
                lock.release()
            else:
                os.close(fd)
            if isinstance(exc, OSError):
                raise RunDirError(f"cannot take the run directory {run_dir}: {exc.strerror or exc}.",
                                  "free disk space or make the directory writable, or use another hydra.run.dir") from exc
            raise

    def take(self, hydra_files: dict[str, str]) -> None:
        """Record this process as the holder, then tidy up what earlier processes left."""
        config_text = hydra_files.get("config.yaml")
        self.record = Holder(
            pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            argv=list(sys.argv), hydra=hydra_files,
            config_sha256=hashlib.sha256(config_text.encode()).hexdigest() if config_text is not None else None,
        )
        _write_fd(self.fd, self.record.to_bytes())
        earlier = Holder.parse(self.previous)
        if earlier is not None and earlier.pid is not None and earlier.ended is None:
            log.warning("the previous run in %s (%s) did not end cleanly (killed?); its lock is free: this run takes "
                        "the directory over", self.run_dir, earlier.describe())
        if self.hydra_writer is not None:  # another process's Hydra may have written over ours before we held the lock
            put_back_hydra(self.hydra_writer, hydra_files, ours=True)
        remove_orphan_temps(self.run_dir)

    def started(self) -> bool:
        """Whether this attempt wrote any of the run's results (else the directory holds what it held)."""
        return result_stamps(self.run_dir) != self.results_before

    def release(self) -> None:
        try:
            if self.started():
                self.record.ended = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                _write_fd(self.fd, self.record.to_bytes())
            else:
                self.undo()
        except (OSError, FinetuneError) as exc:  # never hide the run's own outcome behind a failure to tidy up
            log.warning("could not put %s back as it was: %s", self.run_dir, getattr(exc, "strerror", None) or exc)
        finally:
            os.close(self.fd)  # releases the flock

    def undo(self) -> None:
        """This attempt stopped before it wrote anything of its own: put back the `.hydra/` files and
        the record of the run whose results the directory holds."""
        earlier = Holder.parse(self.previous)
        if self.hydra_writer is not None and earlier is not None and earlier.pid is not None:
            put_back_hydra(self.hydra_writer, earlier.hydra, ours=False)
        if self.created_file:
            os.unlink(self.run_dir / LOCK)  # still held: a process that opened it meanwhile retries (acquire)
            if self.created_dir:
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass  # not empty (Hydra's files, a log): leave it
        else:
            _write_fd(self.fd, self.previous)


def _lock(path: Path, run_dir: Path, hydra_dir: Path | None) -> tuple[int, bool]:
    """Open and flock the lock file: (fd, whether this call created the file). Refuses when another
    process holds it."""
    while True:
        fd, created = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise busy(run_dir, hydra_dir) from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise RunDirError(f"cannot lock {path}: {exc.strerror}.",
                                  "make the run directory writable, or use another hydra.run.dir") from exc
            log.warning("%s: this filesystem cannot lock files (%s): a second run started in this directory would "
                        "not be noticed", path, exc.strerror)
            return fd, created
        # A holder that undid its start removes the lock file it had created: hold the file the path names.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


def busy(run_dir: Path, hydra_dir: Path | None) -> RunDirError:
    """The refusal of a second process: it puts back the holder's `.hydra/` files its Hydra overwrote."""
    holder = None
    for _ in range(_BUSY_READ_TRIES):
        holder = read_record(run_dir)
        if holder is not None and holder.pid is not None and holder.ended is None:
            break
        time.sleep(0.05)
    if hydra_dir is not None and holder is not None and holder.pid is not None:
        try:
            put_back_hydra(hydra_dir, holder.hydra, ours=False)
        except (OSError, FinetuneError) as exc:
            log.warning("could not put back %s: %s", hydra_dir, getattr(exc, "strerror", None) or exc)
    who = holder.describe() if holder is not None else "a process whose record cannot be read"
    kill = f"stop it (kill -TERM {holder.pid}: it writes a checkpoint and exits), " if holder and holder.pid else ""
    return RunDirError(
        f"{run_dir} is in use by another finetune run ({who}): two runs in one directory would mix their files.",
        f"wait for that run to end, or {kill}or use another hydra.run.dir",
    )


# ---- the .hydra/ files -----------------------------------------------------------------------------


def hydra_written_here(run_dir: Path, cfg) -> tuple[Path | None, dict[str, str]]:
    """When this process is a Hydra job whose output dir is `run_dir`: its `.hydra` dir and the text
    Hydra wrote into each file there (Hydra writes `OmegaConf.to_yaml` of each), else (None, {})."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
    except ImportError:
        return None, {}
    if cfg is None or not HydraConfig.initialized():
        return None, {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None or Path(hydra_cfg.runtime.output_dir).resolve() != run_dir.resolve():
        return None, {}
    files = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}
    return run_dir / str(hydra_cfg.output_subdir), files


def put_back_hydra(hydra_dir: Path, files: dict[str, str], ours: bool) -> None:
    """Make `hydra_dir` hold exactly `files` (of HYDRA_FILES); only files that differ are written.
    `ours`: they are this process's own (another process's Hydra had written over them)."""
    from finetune.state import write_atomic

    for name in HYDRA_FILES:
        path = hydra_dir / name
        text = files.get(name)
        if text is None:
            if path.is_file():
                path.unlink()
        elif _read_text(path) != text:
            write_atomic(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
            if ours:
                log.warning("%s had been overwritten by another process starting in this directory: written again", path)
    if not files:
        try:
            hydra_dir.rmdir()
        except OSError:
            pass


# ---- orphan temp files -----------------------------------------------------------------------------


def remove_orphan_temps(run_dir: Path) -> list[Path]:
    """Remove the temp files that writes killed before their rename left behind (under the lock: no
    write of this directory is in progress)."""
    removed = []
    for folder, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        for name in files:
            if ORPHAN_TEMP.match(name):
                path = Path(folder) / name
                try:
                    size = path.lstat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
                log.warning("removed %s (%.1f KiB), a temporary file left by a write that was interrupted",
                            path.relative_to(run_dir), size / 1024)
    return removed


# ---- small helpers --------------------------------------------------------------------------------


def result_stamps(run_dir: Path) -> dict[str, tuple | None]:
    stamps = {}
    for name in RESULT_FILES:
        try:
            st = (run_dir / name).stat()
            stamps[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamps[name] = None
    return stamps


def _open(path: Path) -> tuple[int, bool]:
    """The lock file, opened for reading and writing; whether this call created it."""
    umask = os.umask(0)
    os.umask(umask)
    for _ in range(10):
        try:
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~umask), True
            except FileExistsError:
                return os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # removed between the two opens: create it
            continue
        except OSError as exc:
            raise RunDirError(f"cannot open {path}: {exc.strerror}.",
                              "make the run directory writable, or use another hydra.run.dir") from exc
    raise RunDirError(f"cannot open {path}: it keeps disappearing.", "use another hydra.run.dir")


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _write_fd(fd: int, data: bytes) -> None:
    """In place: the lock file is never replaced (a new inode would be a second, unheld lock). Not
    fsynced: the record informs, it guards nothing a crash of the machine could leave wrong (the
    lock itself dies with the process)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
