"""`finetune-summary SWEEP_DIR`: (re)write the sweep summary of a multirun directory and print it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from finetune.commands import report_error
    from finetune.errors import FinetuneError
    from finetune.sweep import SummaryLock, job_dirs, print_summary, write_sweep_summary

    parser = argparse.ArgumentParser(
        prog="finetune-summary",
        description="(Re)write sweep_summary.csv, sweep_summary.md and sweep.png of a multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.sweep_dir.is_dir():
        print(f"finetune-summary: error: {args.sweep_dir} is not a directory.\n  fix: pass a multirun directory "
              "(e.g. multirun/DATE/TIME)", file=sys.stderr)
        return 2
    if not job_dirs(args.sweep_dir):
        print(f"finetune-summary: error: {args.sweep_dir} holds no job directories (none with a .hydra/ inside).\n"
              "  fix: pass the sweep directory itself (the one holding multirun.yaml and 0/, 1/, ...)", file=sys.stderr)
        return 2
    try:
        with SummaryLock(args.sweep_dir):
            rows, best = write_sweep_summary(args.sweep_dir)
    except FinetuneError as exc:  # a full disk, a read-only directory
        report_error(exc, prog="finetune-summary")
        return exc.exit_code
    print_summary(rows, best, args.sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
