"""Training state on disk: written atomically (temp file, fsync, rename), read back for resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.errors import CheckpointError, TrainingError

LAST = Path("checkpoints") / "last.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)
BEST = Path("checkpoints") / "best.safetensors"


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600; results are ordinary files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise TrainingError(
            f"could not write {path}: {reason} ({free / 2**20:.1f} MiB free there); the previous version, if any, is intact.",
            "free disk space or fix the permissions of the run directory, then rerun the same command to resume",
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def save_training_state(path: Path, state: dict) -> None:
    def write(tmp: Path) -> None:
        # Through a Python file: a full disk then raises OSError(ENOSPC), not a C++ stream error.
        with open(tmp, "wb") as f:
            torch.save(state, f)

    write_atomic(path, write)


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "the file is damaged; delete it to start this run over, or resume from another with trainer.resume=PATH",
        ) from exc


def first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights: an LM's input embedding and
    output projection). Every name keeps its own copy, so the file still loads with strict=True,
    and loading it into the tied model writes the same values into the one tensor."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if storage in seen else tensor
        if storage is not None:
            seen.add(storage)
    return out


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
