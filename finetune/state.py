"""Training state on disk: written atomically (temp file, fsync, rename), read back for resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.errors import CheckpointError, TrainingError
from finetune.storage import unshared

LAST = Path("checkpoints") / "last.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)
BEST = Path("checkpoints") / "best.safetensors"


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only or full file system fails here already
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600; results are ordinary files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        raise write_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(directory: Path) -> None:
    """Make a rename into `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_error(path: Path, exc: BaseException) -> TrainingError:
    """Why `path` could not be written, blaming the disk or the permissions only when the errno says so."""
    code = exc.errno if isinstance(exc, OSError) else None
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    kept = "the previous version, if any, is intact"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return TrainingError(f"could not write {path}: {reason} ({free / 2**20:.1f} MiB free there); {kept}.",
                             "free disk space, then rerun the same command (a run resumes from its last checkpoint)")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return TrainingError(f"could not write {path}: {reason}; {kept}.",
                             f"make {path.parent} writable for this user, then rerun the same command")
    return TrainingError(f"could not write {path}: {reason}; {kept}.",
                         "the reason above is the writer's own; fix it, then rerun the same command")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain Python values only, so the file loads with weights_only=True.
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def digest_path(path: Path) -> Path:
    """`checkpoints/last.pt` -> `checkpoints/last.pt.sha256` (the `sha256sum` format: `sha256sum -c` checks it)."""
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_digests(sidecar: Path) -> list[str]:
    """The digests a sidecar accepts ([] when it is missing or holds none)."""
    try:
        lines = sidecar.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    words = [line.split()[0].lower() for line in lines if line.split()]
    return [w for w in words if re.fullmatch(r"[0-9a-f]{64}", w)]


def write_digests(sidecar: Path, digests: list[str], name: str) -> None:
    unique = list(dict.fromkeys(digests))
    write_atomic(sidecar, lambda tmp: tmp.write_text("".join(f"{d}  {name}\n" for d in unique)))


def save_training_state(path: Path, state: dict) -> None:
    """Write `state` atomically with its sha256 beside it (`path.sha256`). The new digest joins the
    sidecar before the rename and the old one leaves it after, so wherever a kill lands, the
    `last.pt` on disk is one whose digest the sidecar lists."""
    sidecar = digest_path(path)
    written: list[str] = []

    def write(tmp: Path) -> None:
        # Through a Python file: a full disk then raises OSError(ENOSPC), not a C++ stream error.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        written.append(file_sha256(tmp))
        write_digests(sidecar, [*written, *read_digests(sidecar)], path.name)

    write_atomic(path, write)
    write_digests(sidecar, written, path.name)


# What checkpoints/last.pt holds (finetune.session.Session.training_state), and the type of each.
TRAINING_STATE_FIELDS = {"model": dict, "optimizer": dict, "progress": dict, "rng": dict, "audit": dict, "config": dict}
_RESUME_FIX = ("start this run over in a new run directory (or delete checkpoints/ here), or resume from "
               "another checkpoints/last.pt with trainer.resume=PATH")


def load_training_state(path: Path) -> dict:
    """A training state to resume from, verified: its sha256 against the digest written with it, then
    its contents (weights_only, so nothing in it runs) against what finetune writes. Every problem is
    one CheckpointError naming the file."""
    path = Path(path)
    sidecar = digest_path(path)
    accepted = read_digests(sidecar)
    if not accepted:
        raise CheckpointError(
            f"cannot resume from {path}: {sidecar.name} beside it, the digest finetune writes with every training state, "
            f"is {'missing' if not sidecar.exists() else 'unreadable'}, so the file cannot be verified.",
            f"{_RESUME_FIX}; a file you trust that an older finetune wrote can be vouched for with "
            f"`sha256sum {path.name} > {sidecar.name}` in {path.parent}",
        )
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc.strerror or exc}.", _RESUME_FIX) from exc
    if actual not in accepted:
        raise CheckpointError(
            f"cannot resume from {path}: the file is damaged: its sha256 ({actual[:12]}…, {path.stat().st_size} bytes) "
            f"is not the one recorded when it was written ({sidecar.name}: {accepted[0][:12]}…).",
            _RESUME_FIX,
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path}: it is not a training state finetune wrote: {unloadable(exc)}.",
                              _RESUME_FIX) from exc
    check_training_state(path, state)
    return state


def unloadable(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    needs_code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if needs_code:
        return f"it holds a pickled {needs_code.group(1)}, which loading would have to run code for (weights_only refuses it)"
    line = first_line(Exception(text))
    return f"{type(exc).__name__}: {line if len(line) <= 200 else line[:197] + '...'}"


def check_training_state(path: Path, state: Any) -> None:
    """The fields and types finetune writes into a training state (a foreign file fails here, by name)."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(
            f"cannot resume from {path}: it is not a training state finetune wrote: {what}.",
            f"resume from a checkpoints/last.pt of a finetune run (to initialise weights from another checkpoint "
            f"use checkpoint.path=...); {_RESUME_FIX}",
        )

    if not isinstance(state, dict):
        raise refuse(f"it holds a {type(state).__name__}, not a dict")
    missing = [name for name in TRAINING_STATE_FIELDS if name not in state]
    if missing:
        raise refuse(f"it has no {', '.join(missing)} (a training state holds {', '.join(TRAINING_STATE_FIELDS)})")
    for name, kind in TRAINING_STATE_FIELDS.items():
        if not isinstance(state[name], kind):
            raise refuse(f"its {name} is a {type(state[name]).__name__}, not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise refuse("its model is not a state_dict of tensors")
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise refuse("its optimizer is not an optimizer state_dict (state, param_groups)")
    progress = state["progress"]
    if not all(isinstance(progress.get(key), int) for key in ("epoch", "batch", "step")):
        raise refuse("its progress has no epoch, batch and step")
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or "numpy" not in rng or "python" not in rng:
        raise refuse("its rng has no torch, numpy and python states")
    for name in ("scheduler", "scaler", "ema"):  # ema: trainer.ema's averages (finetune.ema.WeightEma)
        if state.get(name) is not None and not isinstance(state[name], dict):
            raise refuse(f"its {name} is a {type(state[name]).__name__}, not a state_dict")


def first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    tensors = unshared({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # the writer's own error type for I/O failures (a full disk)
            raise OSError(str(exc)) from exc

    write_atomic(path, write)
