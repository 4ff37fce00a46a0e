"""Checkpoints are untrusted input: hostile files made for real (FIFOs, sockets, devices, symlinks,
sparse files, zip bombs, crafted safetensors headers) are refused with one message that names the
file, the problem and the fix, never hang the reader, and never make it allocate what the file
does not hold."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.checkpoint.read import read_checkpoint, safetensors_header, sniff_format
from finetune.errors import CheckpointError

GiB = 2**30


def refusal(path: str | Path, zero_copy: bool = False) -> CheckpointError:
    """The error reading `path` raises, with the checks every refusal must pass."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path), zero_copy=zero_copy)
    error = info.value
    assert error.fix, error.problem
    assert "\n" not in error.problem
    return error


def peak_python_bytes(action) -> int:
    """Peak bytes Python allocated while `action` ran (a header read into memory would show here)."""
    tracemalloc.start()
    try:
        action()
    except CheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file with exactly this header and data (no checks: the point is to lie)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def two_tensors() -> tuple[dict, bytes]:
    """A valid header: `a` F32 [2] at 0..8 and `b` F32 [3] at 8..20."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
    return header, torch.arange(5, dtype=torch.float32).numpy().tobytes()


def shard_dir(root: Path, tiny_ckpts, names: dict[str, str]) -> Path:
    """A checkpoint directory whose index maps every tiny key to the shard name given for it."""
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {key: names.get(key, "model-00001-of-00001.safetensors") for key in tiny_ckpts.state_dict}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root / "model.safetensors.index.json"


# ---- 1. an index reaches no file outside its own directory -----------------------------------


@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors", ".."])
def test_index_entry_outside_its_directory_is_refused(tiny_ckpts, tmp_path, entry, zero_copy):
    outside = tmp_path / "outside.safetensors"
    save_file(tiny_ckpts.state_dict, str(outside))  # a real, readable file: only the rule stops it
    entry = str(outside) if entry == "ABSOLUTE" else entry
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    index = shard_dir(tmp_path / "ckpt", tiny_ckpts, {next(iter(tiny_ckpts.state_dict)): entry})
    for target in (index, index.parent):
        error = refusal(target, zero_copy)
        assert str(index) in error.problem and repr(entry) in error.problem  # names the file and the entry
        assert "not a plain relative path inside the index's own directory" in error.problem
        assert str(index.parent) in error.fix


@pytest.mark.parametrize("with_index", [True, False])
def test_shard_symlinked_outside_the_directory_is_refused(tiny_ckpts, tmp_path, with_index):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shard = ckpt / "model-00001-of-00001.safetensors"
    shard.symlink_to(tiny_ckpts.safetensors)  # a real shard, but it lives elsewhere
    if with_index:
        shard_dir(ckpt, tiny_ckpts, {})
    error = refusal(ckpt)
    assert str(shard) in error.problem and "symbolic link" in error.problem and "outside" in error.problem
    assert "copy the file" in error.fix and str(ckpt) in error.fix
    # The fix works: the file itself in the directory reads.
    shard.unlink()
    shard.write_bytes(tiny_ckpts.safetensors.read_bytes())
    assert read_checkpoint(str(ckpt)).format == "sharded"


def test_directory_symlinked_out_through_a_subdirectory_is_refused(tiny_ckpts, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    save_file(tiny_ckpts.state_dict, str(tmp_path / "elsewhere" / "model.safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "sub").symlink_to(tmp_path / "elsewhere")
    index = shard_dir(ckpt, tiny_ckpts, {k: "sub/model.safetensors" for k in tiny_ckpts.state_dict})
    error = refusal(index)
    assert "symbolic link" in error.problem and str(tmp_path / "elsewhere" / "model.safetensors") in error.problem


def test_symlink_inside_the_directory_is_fine(tiny_ckpts, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "blob").write_bytes(tiny_ckpts.safetensors.read_bytes())
    (ckpt / "model-00001-of-00001.safetensors").symlink_to("blob")
    index = shard_dir(ckpt, tiny_ckpts, {})
    assert read_checkpoint(str(index)).state_dict.keys() == tiny_ckpts.state_dict.keys()


@pytest.mark.timeout(20)
def test_index_naming_itself_is_read_as_a_file_not_followed_in_circles(tiny_ckpts, tmp_path):
    index = shard_dir(tmp_path, tiny_ckpts, {k: "model.safetensors.index.json" for k in tiny_ckpts.state_dict})
    error = refusal(index)
    assert "neither a torch file" in error.problem and str(index) in error.problem


# ---- 2. only regular files are opened: a FIFO, socket or device never hangs the reader --------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.safetensors.index.json"])
def test_fifo_as_checkpoint_path_is_refused_without_blocking(tmp_path, name, zero_copy):
    fifo = tmp_path / name
    os.mkfifo(fifo)  # no writer will ever come: open() without O_NONBLOCK would block forever
    error = refusal(fifo, zero_copy)
    assert str(fifo) in error.problem and "FIFO" in error.problem and "not a regular file" in error.problem
    assert "regular file" in error.fix


@pytest.mark.timeout(20)
@pytest.mark.parametrize("with_index", [True, False])
def test_fifo_as_shard_is_refused_without_blocking(tiny_ckpts, tmp_path, with_index):
    os.mkfifo(tmp_path / "model-00001-of-00001.safetensors")
    if with_index:
        shard_dir(tmp_path, tiny_ckpts, {})
    error = refusal(tmp_path)
    assert "shard " + str(tmp_path / "model-00001-of-00001.safetensors") in error.problem and "FIFO" in error.problem


@pytest.mark.timeout(20)
def test_socket_as_checkpoint_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a unix socket's path is limited to ~100 characters: bind by relative name
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("model.safetensors")
        error = refusal(tmp_path / "model.safetensors")
    assert "a socket" in error.problem and str(tmp_path / "model.safetensors") in error.problem


@pytest.mark.timeout(20)
def test_device_as_checkpoint_path_is_refused(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    assert "a character device" in refusal("/dev/zero").problem  # endless zeros: never read
    link = tmp_path / "model.pt"
    link.symlink_to("/dev/zero")  # checkpoint.path itself may be a symlink: what it points at must be a file
    assert "a character device" in refusal(link).problem


def test_directory_named_like_a_shard_is_refused(tiny_ckpts, tmp_path):
    (tmp_path / "model-00001-of-00001.safetensors").mkdir()
    shard_dir(tmp_path, tiny_ckpts, {})
    assert "is a directory, not a regular file" in refusal(tmp_path).problem


# ---- 3. safetensors: sizes and offsets are checked before anything is read or mapped -----------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zero_copy", [False, True])
def test_huge_declared_header_in_a_sparse_file_is_refused_before_reading(tmp_path, zero_copy):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 4 * GiB) + b'{"a":')
        f.truncate(8 * GiB)  # sparse: 8 GiB long, almost nothing on disk
    assert path.stat().st_blocks * 512 < 2**20
    error = refusal(path, zero_copy)
    assert "over the format's limit" in error.problem and str(4 * GiB) in error.problem and str(path) in error.problem
    assert peak_python_bytes(lambda: read_checkpoint(str(path), zero_copy=zero_copy)) < 2**20
    with pytest.raises(CheckpointError, match="over the format's limit"):
        safetensors_header(path)  # finetune-inspect's header-only reader refuses it too
    assert peak_python_bytes(lambda: safetensors_header(path)) < 2**20


@pytest.mark.parametrize("zero_copy", [False, True])
def test_header_longer_than_the_file_is_refused_before_reading(tmp_path, zero_copy):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 90_000_000) + b'{"a": 1}' + bytes(1000))
    error = refusal(path, zero_copy)
    assert "truncated safetensors file" in error.problem and "90000000" in error.problem
    assert peak_python_bytes(lambda: read_checkpoint(str(path), zero_copy=zero_copy)) < 2**20
    assert peak_python_bytes(lambda: safetensors_header(path)) < 2**20


def _set(key: str, field: str, value):
    def change(header: dict, data: bytes):
        header[key][field] = value
        return header, data
    return change


# name: (how the valid two-tensor file is changed, what the message says)
BAD_HEADERS = {
    "overlapping": (_set("b", "data_offsets", [4, 16]), "overlap"),
    "same-bytes-twice": (lambda h, d: ({**h, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, d[:8]), "overlap"),
    "gap": (lambda h, d: ({"a": h["a"], "b": {**h["b"], "data_offsets": [12, 24]}}, d + bytes(4)), "belong to no tensor"),
    "trailing-bytes": (lambda h, d: (h, d + bytes(8)), "belong to no tensor"),
    "beyond-the-file": (_set("b", "data_offsets", [8, 2**40]), "needs 12 bytes"),
    "beyond-the-file-consistent": (lambda h, d: ({**h, "b": {"dtype": "F32", "shape": [2**20], "data_offsets": [8, 8 + 2**22]}}, d),
                                   "truncated safetensors file"),
    "wrong-byte-length": (_set("b", "shape", [4]), "needs 16 bytes but its data_offsets span 12"),
    "dtype-size-mismatch": (_set("b", "dtype", "F64"), "needs 24 bytes"),
    "unknown-dtype": (_set("b", "dtype", "F33"), "has dtype 'F33', not one of"),
    "dtype-not-a-string": (_set("b", "dtype", ["F32"]), "has dtype ['F32'], not one of"),
    "no-dtype": (lambda h, d: ({**h, "b": {"shape": [3], "data_offsets": [8, 20]}}, d), "has dtype None"),
    "negative-dim": (_set("b", "shape", [-3]), "not a list of non-negative integers"),
    "fractional-dim": (_set("b", "shape", [1.5, 2]), "not a list of non-negative integers"),
    "boolean-dim": (_set("b", "shape", [True]), "not a list of non-negative integers"),
    "shape-not-a-list": (_set("b", "shape", 3), "not a list of non-negative integers"),
    "overflowing-shape": (_set("b", "shape", [2**62, 2**62, 0]), "overflows 64 bits"),
    "backwards-offsets": (_set("b", "data_offsets", [20, 8]), "run backwards"),
    "negative-offset": (_set("b", "data_offsets", [-4, 8]), "not two non-negative integers"),
    "three-offsets": (_set("b", "data_offsets", [8, 20, 30]), "not two non-negative integers"),
    "entry-not-an-object": (lambda h, d: ({**h, "b": [1, 2]}, d), "is not an object"),
    "metadata-not-strings": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
}


@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_invalid_tensor_declarations_are_refused_by_both_readers(tmp_path, case, zero_copy):
    change, message = BAD_HEADERS[case]
    path = write_safetensors(tmp_path / "bad.safetensors", *change(*two_tensors()))
    error = refusal(path, zero_copy)
    assert message in error.problem and str(path) in error.problem, error.problem
    assert "re-download" in error.fix
    with pytest.raises(Exception):  # the safetensors library refuses the same file
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


@pytest.mark.parametrize("raw, message", [(b"{]", "not valid JSON"), (b'{"a": "\xff"}', "not UTF-8"),
                                          (b"[1]", "not a JSON object")])
def test_unreadable_headers_are_refused(tmp_path, raw, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=message):
        safetensors_header(path)  # a list header never passes sniffing ('{' at byte 8): read it directly
    if raw.startswith(b"{"):
        for zero_copy in (False, True):
            assert message in refusal(path, zero_copy).problem


def test_memory_mapped_views_never_share_bytes(tmp_path):
    """The case the memory-mapped reader used to accept: two tensors declared over the same bytes."""
    header, data = two_tensors()
    header["b"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path = write_safetensors(tmp_path / "shared.safetensors", header, data[:8])
    assert "overlap" in refusal(path, zero_copy=True).problem


def test_every_dtype_reads_the_same_through_both_readers(tmp_path):
    tensors = {str(d).removeprefix("torch."): torch.arange(6).reshape(2, 3).to(d)
               for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                         torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16,
                         torch.uint8, torch.bool)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.0)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    for zero_copy in (False, True):
        read = read_checkpoint(str(path), zero_copy=zero_copy).state_dict
        assert {k: (v.dtype, v.shape) for k, v in read.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}
        assert all(torch.equal(read[k].view(torch.uint8), v.view(torch.uint8)) for k, v in tensors.items() if v.dim())


def _random_file(rng: random.Random, path: Path) -> Path:
    """A small safetensors file, valid or wrong in one random way."""
    dtypes = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1, "BF16": 2}
    header, position = {}, 0
    for i in range(rng.randint(1, 4)):
        dtype = rng.choice(list(dtypes))
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
        nbytes = dtypes[dtype] * (shape[0] if shape else 1) * (shape[1] if len(shape) > 1 else 1)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    data = bytes(rng.getrandbits(8) & 1 for _ in range(position))  # 0/1 bytes: valid as bool too
    entry = header[rng.choice(list(header))]
    match rng.randint(0, 8):
        case 1:
            entry["data_offsets"][rng.randint(0, 1)] += rng.choice([-2, -1, 1, 2])
        case 2:
            entry["shape"] = [*entry["shape"], rng.randint(0, 2)]
        case 3:
            entry["dtype"] = rng.choice(list(dtypes))
        case 4:
            data = data[: max(0, len(data) - rng.randint(1, 3))]
        case 5:
            data = data + bytes(rng.randint(1, 3))
        case 6:
            other = header[rng.choice(list(header))]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        case 7:
            entry["data_offsets"] = list(reversed(entry["data_offsets"]))
    return write_safetensors(path, header, data)


def _library_reads(path: Path) -> dict | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def test_readers_accept_exactly_what_the_safetensors_library_accepts(tmp_path):
    """The general rule, beyond the hand-made cases: on random valid and damaged files both readers
    refuse exactly the files the library refuses, and read the same tensors from the others."""
    rng = random.Random(0)
    accepted = 0
    for case in range(300):
        path = _random_file(rng, tmp_path / f"{case}.safetensors")
        expected = _library_reads(path)
        for zero_copy in (False, True):
            try:
                read = read_checkpoint(str(path), zero_copy=zero_copy).state_dict
            except CheckpointError:
                read = None
            assert (read is None) == (expected is None), (case, zero_copy, path.read_bytes()[8:200])
            if read is not None:
                assert all(torch.equal(read[k].view(torch.uint8), v.view(torch.uint8)) if v.dim() else torch.equal(read[k], v)
                           for k, v in expected.items())
        accepted += expected is not None
    assert 50 < accepted < 250  # both kinds were exercised


# ---- 4. torch zip files: nothing is inflated or allocated beyond what the file holds ---------


def write_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> Path:
    """A zip archive written by hand, so its directory says exactly what it is told:
    members are (name, method, stored bytes, crc32, declared inflated size)."""
    body, directory = bytearray(), bytearray()
    for name, method, payload, crc, size in members:
        raw_name, offset = name.encode(), len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload), size, len(raw_name), 0)
        body += raw_name + payload
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload), size,
                                 len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path


def torch_members(tiny_ckpts) -> list[tuple[str, int, bytes, int, int]]:
    with zipfile.ZipFile(tiny_ckpts.torch) as archive:
        return [(i.filename, zipfile.ZIP_STORED, archive.read(i), i.CRC, i.file_size) for i in archive.infolist()]


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of `size` zero bytes, built without compressing them: a full flush resets
    the compressor, so one flushed 1 MiB block repeated is the stream. Also the zeros' crc32."""
    chunk = 2**20
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = block.compress(bytes(chunk)) + block.flush(zlib.Z_FULL_FLUSH)
    stream = piece * (size // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc, zeros = 0, bytes(chunk)
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    return stream, crc


@pytest.mark.timeout(60)
def test_zip_bomb_torch_file_is_refused_before_inflating(tiny_ckpts, tmp_path):
    stream, crc = deflated_zeros(2 * GiB)
    members = torch_members(tiny_ckpts)
    prefix = members[0][0].split("/")[0]
    path = write_zip(tmp_path / "bomb.pt", [*members, (f"{prefix}/data/99", zipfile.ZIP_DEFLATED, stream, crc, 2 * GiB)])
    assert path.stat().st_size < 4 * 2**20
    with zipfile.ZipFile(path) as archive:  # a real bomb: 2 GiB of zeros inflate from ~2 MiB
        assert archive.getinfo(f"{prefix}/data/99").file_size == 2 * GiB
        with archive.open(f"{prefix}/data/99") as member:
            assert member.read(2**20) == bytes(2**20)
    assert sniff_format(path) == "torch"
    error = refusal(path)
    assert "compressed zip member" in error.problem and str(path) in error.problem and "torch.save" in error.fix
    assert peak_python_bytes(lambda: read_checkpoint(str(path))) < 16 * 2**20


def test_torch_file_with_every_member_compressed_is_refused(tiny_ckpts, tmp_path):
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(tiny_ckpts.torch) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert "compressed zip member" in refusal(path).problem


def test_zip_directory_declaring_more_than_the_file_holds_is_refused(tiny_ckpts, tmp_path):
    members = torch_members(tiny_ckpts)
    name, method, payload, crc, _ = next(m for m in members if "/data/" in m[0])
    lying = [m if m[0] != name else (name, method, payload, crc, 2**31) for m in members]
    path = write_zip(tmp_path / "lying.pt", lying)
    error = refusal(path)
    assert "declares" in error.problem and str(path.stat().st_size) in error.problem


def test_stored_torch_file_written_by_hand_still_reads(tiny_ckpts, tmp_path):
    """The zip checks refuse lies only: the same members, stored honestly, load."""
    path = write_zip(tmp_path / "honest.pt", torch_members(tiny_ckpts))
    assert read_checkpoint(str(path)).state_dict.keys() == tiny_ckpts.state_dict.keys()


def test_legacy_pickle_declaring_a_huge_storage_is_refused(tmp_path):
    """Legacy files declare storage sizes in the pickle; torch checks them against the data before
    anything is filled (see the comment in read.py), so a lie is refused, not read."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(123457)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    declared = b"J" + struct.pack("<i", 123457)  # the storage's element count, as pickle's BININT
    assert declared in data
    path.write_bytes(data.replace(declared, b"J" + struct.pack("<i", 2**31 - 1), 1))
    error = refusal(path)
    assert "corrupt or truncated" in error.problem and str(path) in error.problem


# ---- messages never carry the file's bytes ---------------------------------------------------


@pytest.mark.parametrize("content", [b"<html>\x1b[2J<script>alert(1)</script></html>",
                                     b"\x80\x02\x1b[2J<script>alert(1)</script>",
                                     b"garbage!" + b"\x1b[2J<script>" * 4])
def test_messages_do_not_echo_the_files_bytes(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    error = refusal(path)
    assert "\x1b" not in str(error) and "<script" not in str(error) and "garbage!" not in str(error)


def test_tensor_names_in_messages_are_escaped(tmp_path):
    header, data = two_tensors()
    header["\x1b[2Jb"] = {**header.pop("b"), "dtype": "F64"}
    error = refusal(write_safetensors(tmp_path / "names.safetensors", header, data))
    assert "\x1b" not in error.problem and "\\x1b[2Jb" in error.problem


# ---- end to end: the finetune command -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_finetune_command_refuses_a_fifo_checkpoint_without_hanging(cli, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    run_dir = tmp_path / "run"
    result = cli("finetune", f"checkpoint.path={fifo}", f"hydra.run.dir={run_dir}", "trainer.progress=false", timeout=200)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "Traceback" not in text, text
    assert result.stderr.count("finetune: error:") == 1 and result.stderr.count("  fix: ") == 1, text
    assert str(fifo) in result.stderr and "FIFO" in result.stderr, text
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "summary.json").exists()
