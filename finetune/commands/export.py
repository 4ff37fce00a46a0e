"""`finetune-export RUN_DIR [--format safetensors|torch_export|onnx ...] [--tolerance X] [overrides]`:
write the deployable artifacts of a finished run and verify each one on the validation data.

- `safetensors`: `merged.safetensors`, the adapters of a run with lora ops folded into the base
  weights (a run without them has nothing to merge: model.safetensors is the plain model already);
- `torch_export`: `model.pt2`, a `torch.export` program of the deployable model;
- `onnx`: `model.onnx` (needs `pip install "finetune[export]"`), run with onnxruntime to verify it.

Without --format: every one of them that applies (onnx where it is installed). Each artifact is run
over the validation data beside the trained model (rebuilt from the run's verified config with its
model.safetensors, as `finetune-eval` does); `export_report.json` records the largest output
difference and each metric of both, and an artifact outside the tolerance is not written and
makes the command exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import importlib.util
import sys
from pathlib import Path

from finetune.commands import report_error
from finetune.errors import FinetuneError

FORMATS = ("safetensors", "torch_export", "onnx")


def wanted_formats(asked: list[str]) -> list[str]:
    """The formats named (comma-separated or repeated), or every one that applies here."""
    if not asked:
        onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
        return [f for f in FORMATS if f != "onnx" or onnx]
    names = [name.strip() for item in asked for name in item.split(",") if name.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        from finetune.errors import ConfigError

        raise ConfigError(f"--format {', '.join(unknown)}: not a format finetune-export writes.",
                          f"use one or more of {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def export_finished_run(run_dir: Path, formats: list[str] = (), tolerance: float | None = None,
                        overrides: list[str] = (), config_dirs: list[str] = (), allow_edited_config: bool = False):
    """Export and verify; returns the ExportReport (raises ExportError when an artifact fails)."""
    from finetune.distributed import SINGLE
    from finetune.export import export_run
    from finetune.finished import open_finished_run, validation_loader
    from finetune.model import pick_device
    from finetune.run_lock import hold_run_dir

    formats = wanted_formats(list(formats))
    with hold_run_dir(Path(run_dir), SINGLE):  # no resume of this run writes model.safetensors meanwhile
        run = open_finished_run(run_dir, overrides, config_dirs, allow_edited_config)
        cfg = run.cfg
        device = pick_device(cfg.trainer.device)
        run.model.to(device)
        tolerance = float(cfg.trainer.export_tolerance if tolerance is None else tolerance)
        return export_run(cfg, run.run_dir, run.model, run.edits, validation_loader(cfg, device), device, formats,
                          tolerance, run.metadata)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*",
                        help="after the run's own, e.g. data.batch_size=256 or trainer.device=cpu (model.* cannot change)")
    parser.add_argument("--format", action="append", default=[], metavar="FORMAT",
                        help=f"one or more of {', '.join(FORMATS)} (repeat or comma-separate); default: every one "
                             "that applies (onnx where onnx, onnxscript and onnxruntime are installed)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest output difference allowed, as a fraction of the trained model's largest output "
                             "(default: the run's trainer.export_tolerance, 1e-4)")
    parser.add_argument("--config-dir", action="append", default=[],
                        help="a directory of your own configs, searched before the ones the run used (repeatable)")
    parser.add_argument("--allow-edited-config", action="store_true",
                        help="export even though the run's .hydra/ config was edited since the run (it names callables: "
                             "use only a config you trust)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import logging

    from finetune.logs import ConsoleFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        report = export_finished_run(args.run_dir, args.format, args.tolerance, args.overrides, args.config_dir,
                                     args.allow_edited_config)
    except FinetuneError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_error(exc, prog="finetune-export")
        return exc.exit_code
    from finetune.console import tables

    print(tables.format_export_report(report))
    print(f"wrote {args.run_dir / 'export_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
