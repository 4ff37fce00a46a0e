"""Read a checkpoint file into a flat `{key: tensor}` dict, safely.

Pickles load with `weights_only=True` only: nothing in a checkpoint is ever executed. The format
is decided by the file's content (zip, legacy pickle, safetensors header), not its extension.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from finetune.errors import CheckpointError

# Entries that hold the weights in common training checkpoints, in order of preference.
_WEIGHT_ENTRIES = ("state_dict", "model", "module", "model_state_dict", "model_state", "net", "network")
_EMA_ENTRIES = ("ema", "model_ema", "state_dict_ema", "ema_state_dict", "ema_model")

CONVERT_SNIPPET = (
    "convert it once, in an environment you trust, to safetensors:\n"
    "      import torch; from safetensors.torch import save_file\n"
    "      sd = torch.load(PATH, weights_only=False)   # runs the pickle: only for files you trust\n"
    "      sd = sd.get('state_dict', sd)\n"
    "      save_file({k: v.contiguous() for k, v in sd.items()}, PATH + '.safetensors')"
)


@dataclass
class CheckpointContents:
    state_dict: dict[str, torch.Tensor]
    format: str  # torch | safetensors | lightning | sharded
    selected: str | None  # nested entry the weights came from; None = top level
    files: list[str]


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle), or raise naming what the bytes look like."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes).", "re-download or re-save it")
    if len(head) >= 9:  # first: a safetensors header length can start with any byte, 0x80 included
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < path.stat().st_size and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK":
        return "torch"
    if head[:1] == b"\x80":  # pickle protocol marker: torch's legacy (non-zip) format
        return "torch"
    raise CheckpointError(
        f"checkpoint {path} is neither a torch file (zip/pickle) nor safetensors (first bytes {head[:8]!r}).",
        "check the path: it may be a download error page, a partial file, or another framework's format",
    )


def _load_torch(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            # torch.load picks its loader by extension for a path; the content said torch: pass bytes.
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary code to unpickle, so it was refused "
            f"(weights_only=True; {str(exc).splitlines()[0]}).",
            CONVERT_SNIPPET.replace("PATH", repr(str(path))),
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "re-download or re-save the file; an interrupted copy is the usual cause",
        ) from exc


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors that are views into a private (copy-on-write) memory map of the file: nothing is
    read until used, and nothing is copied when assigned into a model."""
    import mmap

    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        base = 8 + header_len
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            if end > len(mapped) - base:
                raise ValueError(f"tensor {key} lies past the end of the file (truncated)")
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
            tensors[key] = flat.reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, struct.error, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file: {exc}",
            "re-download or re-save the file; an interrupted copy is the usual cause",
        ) from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file: {exc}",
            "re-download or re-save the file; an interrupted copy is the usual cause",
        ) from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _flatten_tensors(obj: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def select_weights(obj: Any, select: str, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Pick the tensor dict out of a (possibly nested) training checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors.",
            "if it is a pickled nn.Module, save its state_dict() instead (to safetensors, ideally)",
        )
    if select not in ("auto", ""):
        node: Any = obj
        wanted = _EMA_ENTRIES if select == "ema" else None
        if wanted is not None:
            found = [k for k in wanted if isinstance(obj.get(k), Mapping)]
            if not found:
                raise CheckpointError(
                    f"checkpoint.select=ema but {path} has no EMA entry (top-level keys: {sorted(map(str, obj))}).",
                    "use select=auto for the regular weights, or name the entry: select=<dotted.path>",
                )
            return _flatten_tensors(obj[found[0]]), found[0]
        for part in select.split("."):
            if not isinstance(node, Mapping) or part not in node:
                keys = sorted(map(str, node)) if isinstance(node, Mapping) else []
                raise CheckpointError(
                    f"checkpoint.select={select!r}: no entry '{part}' in {path} (entries there: {keys[:20]}).",
                    "use select=auto, or a dotted path to the dict of tensors",
                )
            node = node[part]
        if not _is_tensor_dict(node) and not (isinstance(node, Mapping) and _flatten_tensors(node)):
            raise CheckpointError(f"checkpoint.select={select!r} in {path} is not a dict of tensors.", "point select at the weights")
        return _flatten_tensors(node), select

    if _is_tensor_dict(obj):
        return dict(obj), None
    candidates = [k for k in _WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping) and _flatten_tensors(obj[k])]
    if not candidates:
        tensors = _flatten_tensors(obj)
        if tensors:
            return tensors, None
        raise CheckpointError(
            f"checkpoint {path} has no dict of tensors at its top level or under {', '.join(_WEIGHT_ENTRIES)} "
            f"(entries: {sorted(map(str, obj))[:20]}).",
            "name the entry holding the weights with checkpoint.select=<dotted.path>",
        )
    if len(candidates) > 1:
        raise CheckpointError(
            f"checkpoint {path} holds several weight dicts: {', '.join(candidates)}; which one to load is ambiguous.",
            f"choose one with checkpoint.select={candidates[0]} (or another of them)",
        )
    return _flatten_tensors(obj[candidates[0]]), candidates[0]


def _shard_files(path: Path) -> list[Path]:
    index = path
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if len(indexes) != 1:
            shards = sorted(path.glob("*.safetensors"))
            if shards and not indexes:
                return shards
            raise CheckpointError(
                f"checkpoint directory {path} has {len(indexes)} index files (*.index.json) and no unambiguous shards.",
                "point checkpoint.path at the index JSON (e.g. model.safetensors.index.json) or at one file",
            )
        index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"shard index {index} is not a valid index JSON with a weight_map: {exc}", "re-download it") from exc
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"shard index {index} names missing shard files: {', '.join(absent)}", "download every shard next to the index")
    return files


def read_checkpoint(path_str: str, fmt: str = "auto", select: str = "auto", zero_copy: bool = False) -> CheckpointContents:
    """`zero_copy`: safetensors tensors are views into a memory map (torch files always are)."""
    path = Path(os.path.expanduser(path_str))
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path}",
            "fix checkpoint.path (relative paths are relative to the directory you launched from), "
            "or set checkpoint.path=null to train from scratch",
        )
    if fmt == "sharded" or path.is_dir() or path.name.endswith(".index.json"):
        files = _shard_files(path)
        merged: dict[str, torch.Tensor] = {}
        for shard in files:
            merged.update(read_checkpoint(str(shard), "auto", "auto", zero_copy).state_dict)
        return CheckpointContents(merged, "sharded", None, [str(f) for f in files])

    kind = sniff_format(path)
    if fmt not in ("auto", kind) and not (fmt == "lightning" and kind == "torch"):
        raise CheckpointError(f"checkpoint.format={fmt} but {path} contains {kind} data.", "use checkpoint.format=auto")
    if kind == "safetensors":
        tensors = _mmap_safetensors(path) if zero_copy else _load_safetensors(path)
        if select not in ("auto", ""):
            raise CheckpointError(f"checkpoint.select={select!r} does not apply to a safetensors file (it is flat).", "use select=auto")
        return CheckpointContents(tensors, "safetensors", None, [str(path)])
    obj = _load_torch(path)
    state_dict, selected = select_weights(obj, select, path)
    is_lightning = isinstance(obj, Mapping) and any(str(k).startswith("pytorch-lightning_version") for k in obj)
    return CheckpointContents(state_dict, "lightning" if is_lightning else "torch", selected, [str(path)])
