"""Read a checkpoint file into a flat `{key: tensor}` dict, safely.

Pickles load with `weights_only=True` only: nothing in a checkpoint is ever executed. The format
is decided by the file's content (zip, legacy pickle, safetensors header), not its extension.

A checkpoint, and every file its index names, is untrusted input. So the reader opens regular files
only (a FIFO or a device would block or never end), never leaves the checkpoint's own directory
(`../`, absolute names, symlinks out), checks every declared size and offset against the file before
reading or mapping anything (it never allocates more than the tensors the file declares), and never
quotes the file's bytes in a message.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator, Mapping

import torch

from finetune.errors import CheckpointError
from finetune.matching import listed

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
    # Every tensor is a view of a private, read-only-so-far memory map of its file (safetensors read
    # zero-copy, torch zip files): pages read from it can be given back to the page cache.
    mapped: bool = False


REDOWNLOAD = "re-download or re-save the file; an interrupted download or copy is the usual cause"
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE), in bytes
_MAX_INDEX_BYTES = 100_000_000  # a shard index lists names only: real ones are kilobytes
_SHOWN_CHARS = 120


def _shown(value: Any) -> str:
    """A name taken from an untrusted file, fit for a message: quoted, escaped (no terminal control
    characters), shortened."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _printable(text: str, limit: int = 300) -> str:
    """Text from a reader's error, fit for a message: control characters escaped, shortened."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:limit]


def _reason(exc: BaseException) -> str:
    """The exception's type and first line. Readers of damaged files put what they found in their
    messages (pickle's "invalid load key, '<'"): such quotes of the file are dropped."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = re.sub(r"invalid load key, .*", "invalid load key (not a pickle opcode)", text.splitlines()[0])
    return f"{type(exc).__name__}: {_printable(line)}"


# ---- files: regular ones only, inside the checkpoint's own directory ---------------------------

_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _not_regular(path: Path, what: str, mode: int) -> CheckpointError:
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    return CheckpointError(
        f"{what} {path} is {kind}, not a regular file: checkpoints are read from regular files only "
        "(reading a pipe or a device can block forever or never end).",
        "save the checkpoint to a regular file and point checkpoint.path at it (or at the directory of its shards)",
    )


def _require_regular(path: Path, what: str = "checkpoint") -> None:
    """Before anything opens `path`: open() on a FIFO blocks until a writer comes, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror}).",
                              "check the path and its permissions") from exc
    if not stat.S_ISREG(mode):
        raise _not_regular(path, what, mode)


@contextmanager
def _open_regular(path: Path, what: str = "checkpoint") -> Iterator[BinaryIO]:
    """Open `path` for reading, refusing anything but a regular file. O_NONBLOCK and the fstat after
    opening close the race where the file is swapped for a FIFO between the check and the open."""
    _require_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror}).",
                              "check the path and its permissions") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, mode)
        yield f


def _require_inside(directory: Path, file: Path, what: str) -> None:
    """A file a checkpoint names must be in the checkpoint's own directory, after symlinks are
    followed: a downloaded index or a symlink must not make the reader open files elsewhere."""
    home = os.path.realpath(directory)
    target = os.path.realpath(file)
    if os.path.commonpath([home, target]) != home:
        raise CheckpointError(
            f"{what} {file} is a symbolic link to {target}, outside the checkpoint's directory {directory}: "
            "files a checkpoint names are read from its own directory only.",
            f"copy the file itself into {directory}, e.g. cp --remove-destination {target} {file}",
        )


# ---- format ------------------------------------------------------------------------------------


def _check_header_length(path: Path, header_len: int, size: int) -> None:
    """Before the header is read: its declared length must fit the format's limit and the file."""
    if header_len > _MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"checkpoint {path} declares a safetensors header of {header_len} bytes, over the format's limit of "
            f"{_MAX_SAFETENSORS_HEADER} bytes: no safetensors writer makes such a file, so it was not read.",
            REDOWNLOAD)
    if 8 + header_len > size:
        raise CheckpointError(
            f"checkpoint {path} is a truncated safetensors file: its header alone should be {header_len} bytes, "
            f"the file has {size}.", REDOWNLOAD)


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle), or raise saying what the file is not."""
    with _open_regular(path) as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes).", REDOWNLOAD)
    zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if len(head) >= 9 and head[8:9] == b"{":  # first: a safetensors header length can start with any byte, 0x80 included
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len and (header_len <= _MAX_SAFETENSORS_HEADER or not zip_or_pickle):
            _check_header_length(path, header_len, size)
            return "safetensors"
    if head[:2] == b"PK":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is a truncated or corrupt torch file: it starts as a zip archive (torch's format) "
                f"but its end, the zip directory, is missing ({size} bytes).", REDOWNLOAD)
        return "torch"
    if head[:1] == b"\x80":  # pickle protocol marker: torch's legacy (non-zip) format
        return "torch"
    raise CheckpointError(
        f"checkpoint {path} is neither a torch file (zip/pickle) nor safetensors: it starts with no zip signature, "
        f"no pickle protocol marker and no safetensors header ({size} bytes).",
        "check the path: it may be a download error page, a partial file, or another framework's format",
    )


# ---- torch files -------------------------------------------------------------------------------

_RESAVE = ("re-save it with torch.save, which stores members uncompressed, or convert it to safetensors; "
           "a file you did not make: re-download it")


def _check_zip_members(path: Path, archive_file: BinaryIO) -> None:
    """torch writes zip members STORED (uncompressed): every byte a member holds is a byte of the file.
    A compressed member can inflate to gigabytes from a few kilobytes, and a directory whose entries
    declare more bytes than the file holds (entries sharing data, or lying sizes) makes torch allocate
    what the file does not hold. Both are refused from the zip directory alone, before torch reads a member."""
    size = os.fstat(archive_file.fileno()).st_size
    try:
        members = zipfile.ZipFile(archive_file).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is a truncated or corrupt torch file: {_reason(exc)}", REDOWNLOAD) from exc
    compressed = [m for m in members if m.compress_type != zipfile.ZIP_STORED]
    if compressed:
        first = compressed[0]
        raise CheckpointError(
            f"checkpoint {path} holds {len(compressed)} compressed zip member(s), e.g. {_shown(first.filename)} "
            f"({first.compress_size} bytes that inflate to {first.file_size}); torch writes its members uncompressed, "
            "so it was not read (a compressed member can inflate far beyond the file's size).", _RESAVE)
    declared = sum(m.file_size for m in members)
    lying = [m for m in members if m.compress_size != m.file_size or m.header_offset + m.file_size > size]
    if declared > size or lying:
        raise CheckpointError(
            f"checkpoint {path} is a zip archive whose directory declares {declared} bytes of members in a file of "
            f"{size} bytes; it was not read (torch would allocate what the file does not hold).", _RESAVE)


def _load_torch(path: Path) -> tuple[Any, bool]:
    """The unpickled object, and whether its tensors are views of a memory map of the file (zip files)."""
    # Legacy (non-zip) files declare each storage's element count inside the pickle, and torch
    # allocates that much, uninitialised, before it reads the storage and checks its real size
    # ("storage has wrong byte size"). Bounding the declaration first would mean re-implementing
    # torch's legacy unpickler; the allocation is address space whose pages are never touched, so
    # a lying file fails at that check without using the memory.
    with _open_regular(path) as f:
        is_zip = zipfile.is_zipfile(f)
        if is_zip:
            _check_zip_members(path, f)
    try:
        if path.suffix == ".safetensors":
            # torch.load picks its loader by extension for a path; the content said torch: pass bytes.
            with _open_regular(path) as f:
                return torch.load(f, map_location="cpu", weights_only=True), False
        # torch.load opens the path again; the checks above saw this same path a moment ago.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip), is_zip
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise CheckpointError(f"checkpoint {path} is truncated ({_reason(exc)}).", REDOWNLOAD) from exc
        # torch's message opens with how to load unsafely; the reason is on its "WeightsUnpickler error" line.
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(exc), re.MULTILINE)
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary code to unpickle, so it was refused "
            f"(weights_only=True; {_printable(found.group(1).strip()) if found else _reason(exc)}).",
            CONVERT_SNIPPET.replace("PATH", repr(str(path))),
        ) from exc
    except Exception as exc:  # only torch.load runs here: on damaged bytes it fails in many ways (EOF, index, zip errors)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {_reason(exc)}", REDOWNLOAD) from exc


# ---- safetensors -------------------------------------------------------------------------------

# The dtypes both readers accept: those torch has (the format's sub-byte floats have no torch dtype).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_INT64_LIMIT = 2**63  # torch sizes are int64


class _BadHeader(ValueError):
    """A header that parses but declares something impossible; the text says what, without quoting bytes."""


def _parse_header(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadHeader("its header is not UTF-8 text") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadHeader(f"its header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # numbers too long to convert, nesting too deep
        raise _BadHeader(f"its header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _BadHeader("its header is not a JSON object")
    metadata = header.get("__metadata__")  # optional, null included, as in the library
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _BadHeader("its __metadata__ is not a map of strings")
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT64_LIMIT


def _tensor_span(key: str, entry: Any) -> tuple[int, int]:
    """The (start, end) byte offsets of one declared tensor, after checking that its dtype is known,
    its shape is a list of sizes and its offsets span exactly the bytes that dtype and shape need."""
    name = _shown(key)
    if not isinstance(entry, dict):
        raise _BadHeader(f"the entry of tensor {name} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _BadHeader(f"tensor {name} has dtype {_shown(dtype)}, not one of {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _BadHeader(f"tensor {name} has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _BadHeader(f"tensor {name} has data_offsets that are not two non-negative integers")
    start, end = offsets
    if start > end:
        raise _BadHeader(f"tensor {name} has data_offsets that run backwards ({start} > {end})")
    numel = 1
    for dim in shape:  # checked as it grows, like the library: a product may overflow before a 0 ends it
        numel *= dim
        if numel >= _INT64_LIMIT:
            raise _BadHeader(f"tensor {name} has a shape whose element count overflows 64 bits")
    nbytes = numel * SAFETENSORS_DTYPES[dtype].itemsize
    if end - start != nbytes:
        raise _BadHeader(f"tensor {name} ({dtype}, shape {shape}) needs {nbytes} bytes but its data_offsets span {end - start}")
    return start, end


def _check_layout(spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors lie end to end and cover the data section exactly, as the safetensors library requires:
    no two views share bytes, and no bytes are left that no tensor declares."""
    position, previous = 0, None
    for start, end, key in sorted(spans):
        if start < position:
            raise _BadHeader(f"tensors {_shown(previous)} and {_shown(key)} overlap (bytes {start} to {min(end, position)} of the data)")
        if start > position:
            raise _BadHeader(f"bytes {position} to {start} of the data, before tensor {_shown(key)}, belong to no tensor")
        position, previous = end, key
    if position != data_size:
        raise _BadHeader(f"the last {data_size - position} bytes of the data belong to no tensor")


def _read_header(path: Path, f: BinaryIO) -> tuple[dict, int]:
    """Read and validate the header of the open file `f`; see `safetensors_header`."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"checkpoint {path} is a truncated safetensors file: it has {size} bytes, "
                              "fewer than the 8 of its header length.", REDOWNLOAD)
    (header_len,) = struct.unpack("<Q", prefix)
    _check_header_length(path, header_len, size)  # before reading: the length is the file's claim
    raw = f.read(header_len)
    if len(raw) != header_len:  # the file shrank since its size was taken
        raise CheckpointError(f"checkpoint {path} is a truncated safetensors file: its header is cut short.", REDOWNLOAD)
    base = 8 + header_len
    try:
        header = _parse_header(raw)
        spans = [(*_tensor_span(key, entry), key) for key, entry in header.items() if key != "__metadata__"]
    except _BadHeader as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {exc}.", REDOWNLOAD) from None
    data_end = max((end for _, end, _ in spans), default=0)
    if base + data_end > size:
        raise CheckpointError(
            f"checkpoint {path} is a truncated safetensors file: its header describes {base + data_end} bytes, "
            f"the file has {size} ({100 * size / (base + data_end):.0f}%).", REDOWNLOAD)
    try:
        _check_layout(spans, size - base)
    except _BadHeader as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {exc}.", REDOWNLOAD) from None
    return header, base


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The header and the offset where tensor data starts, validated as the safetensors library does:
    header length within the format's limit and the file (checked before the header is read), every
    tensor's dtype, shape and byte length, offsets inside the data, tensors end to end over all of it.
    Both readers use it, so they refuse the same files, and a truncated file is named as such."""
    with _open_regular(path) as f:
        return _read_header(path, f)


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors that are views into a private (copy-on-write) memory map of the file: nothing is
    read until used, and nothing is copied when assigned into a model. The header is validated and
    the file mapped through one open file, so the views are checked against the bytes they map."""
    import mmap

    with _open_regular(path) as f:
        header, base = _read_header(path, f)
        try:
            mapped = mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, access=mmap.ACCESS_COPY)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} cannot be memory-mapped: {_reason(exc)}", REDOWNLOAD) from exc
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        tensors[key] = flat.reshape(entry["shape"])
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)  # our checks first: the same messages as the memory-mapped reader
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {_reason(exc)}", REDOWNLOAD) from exc


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


def _directory_index(directory: Path) -> Path | None:
    """The one shard index in `directory`, or None."""
    indexes = sorted(directory.glob("*.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"checkpoint directory {directory} holds {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}): "
            "which one to load is ambiguous.",
            f"point checkpoint.path at one of them, e.g. checkpoint.path={indexes[0]}",
        )
    if indexes:
        _require_inside(directory, indexes[0], "shard index")
    return indexes[0] if indexes else None


def _directory_shards(directory: Path) -> list[Path]:
    """A directory without an index: its *.safetensors files."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        held = sorted(p.name for p in directory.iterdir())
        shown = listed(held) if held else "nothing"
        raise CheckpointError(
            f"checkpoint directory {directory} has no shard index (*.index.json) and no *.safetensors file; it holds: {shown}.",
            "point checkpoint.path at the checkpoint file itself, or put the index that names the shards "
            f"({_INDEX_NAMES}) in the directory",
        )
    for shard in shards:
        _require_inside(directory, shard, "shard")
        _require_regular(shard, "shard")
    return shards


def _index_shard_names(index: Path) -> list[str]:
    """The shard names an index's weight_map lists, each once, in order."""
    with _open_regular(index, "shard index") as f:
        size = os.fstat(f.fileno()).st_size
        if size > _MAX_INDEX_BYTES:
            raise CheckpointError(f"shard index {index} has {size} bytes, over {_MAX_INDEX_BYTES}: an index lists "
                                  "names only, so it was not read.", REDOWNLOAD)
        text = f.read(_MAX_INDEX_BYTES)
    try:
        weight_map = json.loads(text)["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError("a weight_map value is not a file name")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"shard index {index} is not a valid index JSON with a weight_map ({_reason(exc)}).",
                              REDOWNLOAD) from exc
    return names


def _shard_path(index: Path, name: str) -> Path:
    """The file a weight_map entry names. It must be a plain relative path inside the index's own
    directory: an index from anywhere must not make the reader open /etc/... or ../other_model."""
    parts = PurePosixPath(name).parts
    if not name or "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts:
        raise CheckpointError(
            f"shard index {index} has weight_map entry {_shown(name)}, which is not a plain relative path inside "
            "the index's own directory; shards are read from that directory only, so nothing was read.",
            f"put the shards in {index.parent} and name them by file name in the weight_map (an index from "
            "someone else: re-download it)",
        )
    shard = index.parent / name
    _require_inside(index.parent, shard, "shard")
    return shard


def _shard_files(path: Path) -> list[Path]:
    """The files of a sharded checkpoint: those its index JSON names, or, in a directory without an
    index, its *.safetensors files. Each is a regular file inside the checkpoint's directory."""
    index = _directory_index(path) if path.is_dir() else path
    if index is None:
        return _directory_shards(path)
    files = [_shard_path(index, name) for name in _index_shard_names(index)]
    absent = [f.name for f in files if not f.exists()]
    if absent:
        raise CheckpointError(
            f"shard index {index} names {len(files)} shard files; {len(absent)} of them are missing from {index.parent}: "
            f"{', '.join(absent[:8])}{', ...' if len(absent) > 8 else ''}",
            f"download every shard the index names into {index.parent}",
        )
    for shard in files:
        _require_regular(shard, "shard")
    return files


def _read_file(path: Path, fmt: str, select: str, zero_copy: bool) -> CheckpointContents:
    """One checkpoint file (never an index: a shard that names an index is read as a file, so an
    index cannot send the reader round in circles)."""
    kind = sniff_format(path)
    if fmt not in ("auto", kind) and not (fmt == "lightning" and kind == "torch"):
        raise CheckpointError(f"checkpoint.format={fmt} but {path} contains {kind} data.", "use checkpoint.format=auto")
    if kind == "safetensors":
        tensors = _mmap_safetensors(path) if zero_copy else _load_safetensors(path)
        if select not in ("auto", ""):
            raise CheckpointError(f"checkpoint.select={select!r} does not apply to a safetensors file (it is flat).", "use select=auto")
        return CheckpointContents(tensors, "safetensors", None, [str(path)], mapped=zero_copy)
    obj, mapped = _load_torch(path)
    state_dict, selected = select_weights(obj, select, path)
    is_lightning = isinstance(obj, Mapping) and any(str(k).startswith("pytorch-lightning_version") for k in obj)
    return CheckpointContents(state_dict, "lightning" if is_lightning else "torch", selected, [str(path)], mapped=mapped)


def _read_shards(path: Path, zero_copy: bool) -> CheckpointContents:
    files = _shard_files(path)
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    mapped = True
    for shard in files:
        contents = _read_file(shard, "auto", "auto", zero_copy)
        mapped = mapped and contents.mapped
        for key, tensor in contents.state_dict.items():
            if key in merged:  # two files holding one key: not shards of one checkpoint
                raise CheckpointError(
                    f"checkpoint key {_shown(key)} is in two files of {path}: {origin[key].name} and {shard.name}.",
                    "point checkpoint.path at one file (a directory without an index must hold only the shards of one checkpoint)",
                )
            merged[key], origin[key] = tensor, shard
    return CheckpointContents(merged, "sharded", None, [str(f) for f in files], mapped=mapped)


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
        return _read_shards(path, zero_copy)
    return _read_file(path, fmt, select, zero_copy)
