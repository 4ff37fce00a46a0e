"""finetune.checkpoint.read: format by content, safe unpickling, nested entries, shards."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from finetune.checkpoint.read import read_checkpoint, sniff_format
from finetune.errors import CheckpointError


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- format by content, not by extension -----------------------------------------------------


def test_reads_safetensors_and_torch(tiny_ckpts):
    for path, fmt in [(tiny_ckpts.safetensors, "safetensors"), (tiny_ckpts.torch, "torch")]:
        contents = read_checkpoint(str(path))
        assert contents.format == fmt
        assert contents.selected is None
        assert contents.files == [str(path)]
        assert same_tensors(contents.state_dict, tiny_ckpts.state_dict)


@pytest.mark.parametrize("source, name, fmt", [("safetensors", "weights.pt", "safetensors"),
                                               ("torch", "weights.safetensors", "torch")])
def test_format_decided_by_content_not_extension(tiny_ckpts, tmp_path, source, name, fmt):
    disguised = tmp_path / name
    shutil.copy(getattr(tiny_ckpts, source), disguised)
    assert sniff_format(disguised) == fmt
    contents = read_checkpoint(str(disguised))
    assert contents.format == fmt
    assert same_tensors(contents.state_dict, tiny_ckpts.state_dict)


def test_legacy_non_zip_torch_file(tiny_ckpts, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(tiny_ckpts.state_dict, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "torch"
    assert same_tensors(read_checkpoint(str(path)).state_dict, tiny_ckpts.state_dict)


def test_explicit_format_contradicting_content(tiny_ckpts):
    with pytest.raises(CheckpointError, match="checkpoint.format=safetensors"):
        read_checkpoint(str(tiny_ckpts.torch), "safetensors")
    with pytest.raises(CheckpointError, match="checkpoint.format=torch"):
        read_checkpoint(str(tiny_ckpts.safetensors), "torch")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(tmp_path / "nope.pt"))
    assert "not found" in info.value.problem and "nope.pt" in info.value.problem
    assert "checkpoint.path" in info.value.fix


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("content", [b"<html>404 Not Found</html>", bytes(range(7)), b"\x00" * 64])
def test_garbage_bytes(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="neither a torch file"):
        read_checkpoint(str(path))


def test_truncated_torch_zip(tiny_ckpts, tmp_path):
    data = tiny_ckpts.torch.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert "truncated" in info.value.problem and str(path) in info.value.problem
    assert "re-download" in info.value.fix


@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.99, 40])  # half, all but the last bytes, inside the header
def test_truncated_safetensors(tiny_ckpts, tmp_path, zero_copy, keep):
    data = tiny_ckpts.safetensors.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path), zero_copy=zero_copy)
    assert "truncated safetensors file" in info.value.problem and str(path) in info.value.problem
    assert "re-download" in info.value.fix


def test_truncated_legacy_pickle_is_an_error_never_a_crash(tiny_ckpts, tmp_path):
    full = tmp_path / "legacy.pth"
    torch.save(tiny_ckpts.state_dict, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    for size in range(1, len(data), max(1, len(data) // 97)):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(str(path))
        assert str(path) in info.value.problem


# ---- nothing from a checkpoint is ever executed ----------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_payload_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert not marker.exists(), "the checkpoint's code ran"
    assert "refused" in info.value.problem
    assert "safetensors" in info.value.fix  # how to convert a trusted file
    # The payload is real: an unsafe load does run it (so the check above can fail).
    if writer == "pickle.dump":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(str(path))


# ---- nested entries --------------------------------------------------------------------------


@pytest.mark.parametrize("attr, entry", [("nested_state_dict", "state_dict"), ("nested_model", "model")])
def test_nested_entry_found_automatically(tiny_ckpts, attr, entry):
    contents = read_checkpoint(str(getattr(tiny_ckpts, attr)))
    assert contents.selected == entry
    assert same_tensors(contents.state_dict, tiny_ckpts.state_dict)


def test_ambiguous_candidates_error(tiny_ckpts, tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"state_dict": tiny_ckpts.state_dict, "model": tiny_ckpts.state_dict}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert "state_dict" in info.value.problem and "model" in info.value.problem and "ambiguous" in info.value.problem
    assert "checkpoint.select=" in info.value.fix
    assert read_checkpoint(str(path), select="model").selected == "model"


def test_select_dotted_path(tiny_ckpts, tmp_path):
    path = tmp_path / "deep.pt"
    other = {k: v + 1 for k, v in tiny_ckpts.state_dict.items()}
    torch.save({"trainer": {"weights": tiny_ckpts.state_dict, "step": 4}, "state_dict": other}, path)
    contents = read_checkpoint(str(path), select="trainer.weights")
    assert contents.selected == "trainer.weights"
    assert same_tensors(contents.state_dict, tiny_ckpts.state_dict)
    assert same_tensors(read_checkpoint(str(path)).state_dict, other)  # auto picks state_dict


def test_select_missing_entry(tiny_ckpts, tmp_path):
    path = tmp_path / "deep.pt"
    torch.save({"trainer": {"weights": tiny_ckpts.state_dict}}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path), select="trainer.wieghts")
    assert "wieghts" in info.value.problem and "weights" in info.value.problem  # names what is there


def test_select_ema(tiny_ckpts, tmp_path):
    path = tmp_path / "ema.pt"
    ema = {k: v * 2 for k, v in tiny_ckpts.state_dict.items()}
    torch.save({"model": tiny_ckpts.state_dict, "model_ema": ema}, path)
    assert read_checkpoint(str(path)).selected == "model"
    contents = read_checkpoint(str(path), select="ema")
    assert contents.selected == "model_ema" and same_tensors(contents.state_dict, ema)
    with pytest.raises(CheckpointError, match="no EMA entry"):
        read_checkpoint(str(tiny_ckpts.nested_model), select="ema")


def test_select_does_not_apply_to_safetensors(tiny_ckpts):
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(str(tiny_ckpts.safetensors), select="state_dict")


def test_no_tensors_anywhere(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="no dict of tensors"):
        read_checkpoint(str(path))


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(str(path))


def test_lightning_checkpoint(tiny_ckpts, tmp_path):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"pytorch-lightning_version": "2.1.0", "epoch": 3,
                "state_dict": {f"net.{k}": v for k, v in tiny_ckpts.state_dict.items()}}, path)
    contents = read_checkpoint(str(path))
    assert contents.format == "lightning" and contents.selected == "state_dict"
    assert set(contents.state_dict) == {f"net.{k}" for k in tiny_ckpts.state_dict}


# ---- shards ----------------------------------------------------------------------------------


def test_sharded_safetensors(tiny_ckpts, tmp_path):
    sd = tiny_ckpts.state_dict
    keys = list(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for target in (index, tmp_path):
        contents = read_checkpoint(str(target))
        assert contents.format == "sharded" and len(contents.files) == 2
        assert same_tensors(contents.state_dict, sd)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    for target in (index, tmp_path):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(str(target))
        assert str(index) in info.value.problem and "1 of them are missing" in info.value.problem
        assert "model-00002-of-00002.safetensors" in info.value.problem
        assert "download every shard" in info.value.fix


def test_directory_without_index_or_safetensors(tmp_path):
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
    (tmp_path / "README.md").write_text("weights")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(tmp_path))
    assert str(tmp_path) in info.value.problem and "no shard index" in info.value.problem
    assert "pytorch_model-00001-of-00002.bin" in info.value.problem  # says what it found instead
    assert "index" in info.value.fix and "checkpoint.path" in info.value.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds: nothing"):
        read_checkpoint(str(empty))


def test_directory_with_two_indexes_is_ambiguous(tmp_path):
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        (tmp_path / name).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="ambiguous") as info:
        read_checkpoint(str(tmp_path))
    assert "checkpoint.path=" in info.value.fix


def test_directory_of_unrelated_safetensors_files_is_refused(tiny_ckpts, tmp_path):
    shutil.copy(tiny_ckpts.safetensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_ckpts.safetensors, tmp_path / "model_ema.safetensors")
    with pytest.raises(CheckpointError, match="in two files") as info:
        read_checkpoint(str(tmp_path))
    assert "model.safetensors" in info.value.problem and "model_ema.safetensors" in info.value.problem


def test_invalid_index_json(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-0')
    with pytest.raises(CheckpointError, match="not a valid index JSON"):
        read_checkpoint(str(index))


# ---- finetune-inspect reads the same way -----------------------------------------------------


def test_inspect_names_a_truncated_safetensors_file(tiny_ckpts, tmp_path, capsys):
    from finetune.commands.inspect import main

    data = tiny_ckpts.safetensors.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert main([str(path)]) != 0
    err = capsys.readouterr().err
    assert "truncated safetensors file" in err and str(path) in err and "fix:" in err
    assert main([str(tiny_ckpts.safetensors), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tensors"]
    assert {t["name"]: t["shape"] for t in listed} == {k: list(v.shape) for k, v in tiny_ckpts.state_dict.items()}
