"""`finetune-inspect CKPT [overrides] [--json] [--config-dir DIR]`: what a checkpoint holds and,
given model overrides, how it matches that model (with suggested remap rules)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from finetune.commands import report_error
from finetune.errors import FinetuneError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="finetune-inspect",
        description="List a checkpoint's tensors; with model overrides (e.g. model=resnet18), show how it "
        "matches that model and suggest remap rules.",
    )
    parser.add_argument("checkpoint", help="a .pt/.pth/.bin/.ckpt/.safetensors file, a shard index or a directory")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides selecting the model, e.g. model=demo checkpoint.remap=[...]")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--config-dir", action="append", default=[], help="a directory of your own configs (as for finetune)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.inspection import list_tensors, match_report

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fmt, infos = list_tensors(args.checkpoint)
        report = match_report(args.checkpoint, args.overrides, args.config_dir) if args.overrides else None
    except FinetuneError as exc:
        report_error(exc)
        return exc.exit_code
    except (HydraException, OmegaConfBaseException) as exc:  # a bad value met after composing: Hydra's own message
        print(f"finetune-inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {"checkpoint": args.checkpoint, "format": fmt, "tensors": [asdict(i) for i in infos]}
        if report is not None:
            out["match"] = report.to_json()
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    from finetune.console.tables import format_load_report, format_tensor_listing

    print(format_tensor_listing(args.checkpoint, fmt, infos))
    if report is not None:
        print()
        print(format_load_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
