"""Read a checkpoint file into a flat `{key: tensor}` dict, safely.

Pickles load with `weights_only=True` only: nothing in a checkpoint is ever executed. The format
is decided by the file's content (zip, legacy pickle, safetensors header), not its extension.
"""

from __future__ import annotations

import json
import os
import pickle
import re
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


REDOWNLOAD = "re-download or re-save the file; an interrupted download or copy is the usual cause"
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle), or raise naming what the bytes look like."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes).", REDOWNLOAD)
    if len(head) >= 9 and head[8:9] == b"{":  # first: a safetensors header length can start with any byte, 0x80 included
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < size:
            return "safetensors"
        if 0 < header_len <= _MAX_SAFETENSORS_HEADER:
            raise CheckpointError(
                f"checkpoint {path} is a truncated safetensors file: its header alone should be {header_len} bytes, "
                f"the file has {size}.", REDOWNLOAD)
    if head[:2] == b"PK":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is a truncated or corrupt torch file: it starts as a zip archive (torch's format) "
                f"but its end, the zip directory, is missing ({size} bytes).", REDOWNLOAD)
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
        if "truncated" in str(exc):
            raise CheckpointError(f"checkpoint {path} is truncated ({_reason(exc)}).", REDOWNLOAD) from exc
        # torch's message opens with how to load unsafely; the reason is on its "WeightsUnpickler error" line.
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(exc), re.MULTILINE)
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary code to unpickle, so it was refused "
            f"(weights_only=True; {found.group(1).strip() if found else _reason(exc)}).",
            CONVERT_SNIPPET.replace("PATH", repr(str(path))),
        ) from exc
    except Exception as exc:  # only torch.load runs here: on damaged bytes it fails in many ways (EOF, index, zip errors)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {_reason(exc)}", REDOWNLOAD) from exc


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed header and the offset where tensor data starts. Checks that the file holds all the
    data the header describes, so a truncated file is named as such by either reader."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        base = 8 + header_len
        data_end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info.get("dtype"), str) or not isinstance(info.get("shape"), list):
                raise ValueError(f"entry {key!r} has no dtype or shape")
            _start, end = info["data_offsets"]
            data_end = max(data_end, int(end))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: its header is unreadable ({_reason(exc)}).",
                              REDOWNLOAD) from exc
    size = path.stat().st_size
    if base + data_end > size:
        raise CheckpointError(
            f"checkpoint {path} is a truncated safetensors file: its header describes {base + data_end} bytes, "
            f"the file has {size} ({100 * size / (base + data_end):.0f}%).", REDOWNLOAD)
    return header, base


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors that are views into a private (copy-on-write) memory map of the file: nothing is
    read until used, and nothing is copied when assigned into a model."""
    import mmap

    header, base = safetensors_header(path)
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
            tensors[key] = flat.reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {_reason(exc)}", REDOWNLOAD) from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {exc}", REDOWNLOAD) from exc


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


_INDEX_NAMES = "model.safetensors.index.json or pytorch_model.bin.index.json"


def _shard_files(path: Path) -> list[Path]:
    """The files of a sharded checkpoint: those its index JSON names, or, in a directory without an
    index, its *.safetensors files."""
    index = path
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(
                f"checkpoint directory {path} holds {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}): "
                "which one to load is ambiguous.",
                f"point checkpoint.path at one of them, e.g. checkpoint.path={indexes[0]}",
            )
        if not indexes:
            shards = sorted(path.glob("*.safetensors"))
            if shards:
                return shards
            held = sorted(p.name for p in path.iterdir())
            shown = ", ".join(held[:8]) + (f", ... ({len(held)} in all)" if len(held) > 8 else "") if held else "nothing"
            raise CheckpointError(
                f"checkpoint directory {path} has no shard index (*.index.json) and no *.safetensors file; it holds: {shown}.",
                "point checkpoint.path at the checkpoint file itself, or put the index that names the shards "
                f"({_INDEX_NAMES}) in the directory",
            )
        index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"shard index {index} is not a valid index JSON with a weight_map ({_reason(exc)}).",
                              REDOWNLOAD) from exc
    files = [index.parent / name for name in names]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(
            f"shard index {index} names {len(files)} shard files; {len(absent)} of them are missing from {index.parent}: "
            f"{', '.join(absent[:8])}{', ...' if len(absent) > 8 else ''}",
            f"download every shard the index names into {index.parent}",
        )
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
        origin: dict[str, Path] = {}
        for shard in files:
            for key, tensor in read_checkpoint(str(shard), "auto", "auto", zero_copy).state_dict.items():
                if key in merged:  # two files holding one key: not shards of one checkpoint
                    raise CheckpointError(
                        f"checkpoint key '{key}' is in two files of {path}: {origin[key].name} and {shard.name}.",
                        "point checkpoint.path at one file (a directory without an index must hold only the shards of one checkpoint)",
                    )
                merged[key], origin[key] = tensor, shard
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
