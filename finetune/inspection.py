"""What a checkpoint holds (`list_tensors`), and how it matches a configured model
(`match_report`): what `finetune-inspect` shows.

Tensor data is not read: safetensors headers only, torch files memory-mapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    numel: int
    bytes: int


def list_tensors(path: str, fmt: str = "auto", select: str = "auto") -> tuple[str, list[TensorInfo]]:
    from finetune.checkpoint.read import SAFETENSORS_DTYPES, read_checkpoint, safetensors_header, sniff_format

    target = Path(path).expanduser()
    if target.is_file() and not target.name.endswith(".index.json") and sniff_format(target) == "safetensors":
        header, _ = safetensors_header(target)  # the header alone, validated: no tensor data is read
        infos = []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = str(SAFETENSORS_DTYPES[entry["dtype"]]).removeprefix("torch.")
            start, end = entry["data_offsets"]  # validated: exactly numel × itemsize bytes
            infos.append(TensorInfo(key, list(entry["shape"]), dtype, math.prod(entry["shape"]), end - start))
        return "safetensors", infos
    contents = read_checkpoint(path, fmt, select)
    return contents.format, [
        TensorInfo(k, list(t.shape), str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size())
        for k, t in contents.state_dict.items()
    ]


def match_report(path: str, overrides: list[str], config_dirs: list[str] = ()):
    """Build the configured model and load the checkpoint into it: the same code path as a run."""
    from finetune.checkpoint.load import load_checkpoint
    from finetune.compose import as_search_path_entry, compose_config
    from finetune.model import build_model

    cfg = compose_config([*overrides, f"checkpoint.path={path}"], [as_search_path_entry(d) for d in config_dirs])
    model, edits = build_model(cfg.model)
    return load_checkpoint(model, cfg.checkpoint, edits)
