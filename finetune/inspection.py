"""finetune-inspect CKPT [overrides] [--json]: what a checkpoint holds, and how it matches a model.

Tensor data is not read: safetensors headers only, torch files memory-mapped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import FinetuneError


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    numel: int
    bytes: int


_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def list_tensors(path: str, fmt: str = "auto", select: str = "auto") -> tuple[str, list[TensorInfo]]:
    from finetune.checkpoint.read import read_checkpoint, safetensors_header, sniff_format

    target = Path(path).expanduser()
    if target.is_file() and not target.name.endswith(".index.json") and sniff_format(target) == "safetensors":
        header, _ = safetensors_header(target)  # the header alone: no tensor data is read
        infos = []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shape = list(entry["shape"])
            numel = math.prod(shape)
            name, itemsize = _SAFETENSORS_DTYPES.get(entry["dtype"], (str(entry["dtype"]).lower(), 0))
            infos.append(TensorInfo(key, shape, name, numel, numel * itemsize))
        return "safetensors", infos
    contents = read_checkpoint(path, fmt, select)
    return contents.format, [
        TensorInfo(k, list(t.shape), str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size())
        for k, t in contents.state_dict.items()
    ]


def format_listing(path: str, fmt: str, infos: list[TensorInfo]) -> str:
    from finetune.render import _table, group_keys, human

    by_name = {i.name: i for i in infos}
    rows = []
    for label, names in group_keys(by_name).items():
        members = [by_name[n] for n in names]
        dtypes = sorted({m.dtype for m in members})
        example = members[0]
        rows.append([label, len(members), human(sum(m.numel for m in members)), f"{sum(m.bytes for m in members) / 2**20:.2f} MiB",
                     "/".join(dtypes), f"{example.name.split('.')[-1]} {example.shape}"])
    total = sum(i.bytes for i in infos)
    head = f"{path} ({fmt}): {len(infos)} tensors, {human(sum(i.numel for i in infos))} elements, {total / 2**20:.2f} MiB"
    return head + "\n" + _table(["prefix", "tensors", "numel", "size", "dtype", "e.g."], rows)


def match_report(path: str, overrides: list[str]):
    """Build the configured model and load the checkpoint into it: the same code path as a run."""
    from hydra import compose, initialize_config_dir

    from finetune import config as _config  # noqa: F401
    from finetune.checkpoint.load import load_checkpoint
    from finetune.model import base_param_names, build_model
    from finetune.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"checkpoint.path={path}"])
    model, edits = build_model(cfg.model)
    return load_checkpoint(model, cfg.checkpoint, base_param_names(model, edits))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-inspect",
        description="List a checkpoint's tensors; with model overrides (e.g. model=resnet18), show how it "
        "matches that model and suggest remap rules.",
    )
    parser.add_argument("checkpoint", help="a .pt/.pth/.bin/.ckpt/.safetensors file, a shard index or a directory")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides selecting the model, e.g. model=demo checkpoint.remap=[...]")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--config-dir", action="append", default=[], help="a directory of your own configs (as for finetune)")
    args = parser.parse_intermixed_args(argv)
    if args.config_dir:
        dirs = ",".join(f"file://{Path(d).resolve()}" for d in args.config_dir)
        args.overrides.append(f"hydra.searchpath=[{dirs}]")
    try:
        fmt, infos = list_tensors(args.checkpoint)
        report = match_report(args.checkpoint, args.overrides) if args.overrides and not all(o.startswith('hydra.searchpath') for o in args.overrides) else None
    except FinetuneError as exc:
        from finetune.cli import report_error

        report_error(exc)
        return exc.exit_code
    except (HydraException, OmegaConfBaseException) as exc:  # a bad override: Hydra's own message
        print(f"finetune-inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {"checkpoint": args.checkpoint, "format": fmt, "tensors": [asdict(i) for i in infos]}
        if report is not None:
            out["match"] = report.to_json()
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(format_listing(args.checkpoint, fmt, infos))
    if report is not None:
        from finetune.render import format_load_report

        print()
        print(format_load_report(report))
    return 0
