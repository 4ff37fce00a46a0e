"""Benchmarks, measured as ratios inside one process (these machines are noisy).

    python scripts/bench.py audit            # gradient/frozen audit overhead vs a training epoch
    python scripts/bench.py all --out bench_results.json

Results are printed and written as JSON (default: bench_results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from finetune import config as _config  # noqa: F401
    from finetune.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


@contextmanager
def timed_functions(targets: list[tuple[object, str]], totals: dict[str, float]):
    """Wrap module attributes with timers that add their wall time to `totals`."""
    originals = []
    for module, name in targets:
        original = getattr(module, name)
        originals.append((module, name, original))

        def wrapper(*args, __original=original, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                totals[__name] = totals.get(__name, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def bench_audit(epochs: int = 3) -> dict:
    """Audit cost (first-step gradient check, optimizer/trainable check, frozen checksums before
    and after) as a fraction of one training epoch, on the demo and on a ResNet-18 linear probe."""
    import finetune.loop
    import finetune.run
    from finetune.run import run

    cases = {
        "demo (full fine-tune)": ["trainer.progress=false", f"trainer.epochs={epochs}"],
        "demo (probe_then_finetune)": ["policy=probe_then_finetune", "trainer.progress=false", f"trainer.epochs={epochs}",
                                       "policy.unfreeze.0.at_epoch=2"],
        "resnet18 64x64 linear probe (fake data)": [
            "model=resnet18", "checkpoint=none", "data=fake", "data.train.image_size=[3,64,64]", "data.val.image_size=[3,64,64]",
            "data.train.size=512", "policy.new=freeze", "policy.train=[fc]", "policy.bn=freeze_stats", "trainer.progress=false",
            f"trainer.epochs={epochs}",
        ],
    }
    results = {}
    for label, overrides in cases.items():
        totals: dict[str, float] = {}
        targets = [(finetune.loop, "audit_gradients"), (finetune.loop, "check_optimizer_matches"),
                   (finetune.run, "check_optimizer_matches"), (finetune.run, "checksums"), (finetune.run, "frozen_tensors")]
        epoch_totals: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp, timed_functions(targets, totals), \
                timed_functions([(finetune.loop.Loop, "fit")], epoch_totals):
            cfg = compose(overrides)
            start = time.perf_counter()
            summary = run(cfg, Path(tmp))
            wall = time.perf_counter() - start
        # One epoch as the user waits for it: training steps, evaluation and the epoch's checkpoint.
        epoch_s = (epoch_totals["fit"] - totals.get("audit_gradients", 0.0) - totals.get("check_optimizer_matches", 0.0)) / summary["epochs"]
        audit_s = sum(totals.values())
        results[label] = {
            "audit_s": round(audit_s, 5),
            "train_epoch_s": round(epoch_s, 4),
            "audit_over_one_epoch": round(audit_s / epoch_s, 5),
            "audit_parts_s": {k: round(v, 5) for k, v in totals.items()},
            "run_wall_s": round(wall, 2),
        }
        print(f"audit  {label:45s} audit {audit_s * 1000:7.1f} ms  epoch {epoch_s:6.2f} s  "
              f"overhead {100 * audit_s / epoch_s:5.2f}% of one epoch (target <= 2%)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["audit", "all"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results.json")
    args = parser.parse_args()
    os.environ.setdefault("FINETUNE_CACHE", str(Path(tempfile.gettempdir()) / "finetune-bench-cache"))
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if args.what in ("audit", "all"):
        results["audit"] = bench_audit()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous.update(results)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
