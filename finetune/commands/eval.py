"""`finetune-eval RUN_DIR [overrides] [--config-dir DIR] [--weights FILE]`: rebuild the run's config
with Hydra's compose API from what its .hydra/ recorded (overrides, the config dirs it used), load its
model.safetensors (or model_ema.safetensors, checkpoints/best.safetensors) strictly, evaluate on the validation data, and write RUN_DIR/eval.json as
{"metrics": {"val/loss": ..., "val/<task metric>": ...}, ...}.

The overrides given here come after the run's own: `data.batch_size=256` replaces the run's value,
`data=other` the run's data group (with the run's own data.* overrides). A run directory whose
config no longer matches the one its weights were trained with is refused: a `.hydra/config.yaml`
whose sha256 is not the one the run recorded, edited overrides, a changed config file
(`--allow-edited-config`: a warning instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.commands import report_error
from finetune.errors import FinetuneError

RESULT = "eval.json"


def evaluate_run(run_dir: Path, overrides: list[str] = (), config_dirs: list[str] = (),
                 allow_edited_config: bool = False, weights: str = "model.safetensors") -> dict:
    """Evaluate a finished run; returns what it writes to RUN_DIR/eval.json. The run's recorded
    config is verified before anything is composed or built from it (`allow_edited_config`: an
    edited one is used with a warning, recorded in eval.json as `edited_config`)."""
    from finetune.finished import open_finished_run, validation_loader
    from finetune.loop import evaluate
    from finetune.model import pick_device
    from finetune.state import write_json
    from finetune.task import Task

    run = open_finished_run(run_dir, overrides, config_dirs, allow_edited_config, weights)
    cfg = run.cfg
    device = pick_device(cfg.trainer.device)
    run.model.to(device)
    task = Task.from_config(cfg.task).to(device)
    loader = validation_loader(cfg, device)
    metrics = evaluate(run.model, loader, task, device, cfg.trainer.precision)
    result = {"metrics": {f"val/{name}": value for name, value in metrics.items()}, "weights": str(run.weights),
              "samples": len(loader.dataset), "overrides": list(overrides), "config_dirs": list(config_dirs)}
    if run.edited:
        result["edited_config"] = run.edited
    write_json(run.run_dir / RESULT, result)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*",
                        help="after the run's own: key=value (data.batch_size=256) or group=name (data=imagefolder)")
    parser.add_argument("--config-dir", action="append", default=[],
                        help="a directory of your own configs, searched before the ones the run used (repeatable)")
    parser.add_argument("--weights", default="model.safetensors",
                        help="which of the run's weights: model.safetensors (default), model_ema.safetensors "
                             "(trainer.ema) or checkpoints/best.safetensors")
    parser.add_argument("--allow-edited-config", action="store_true",
                        help="evaluate even though the run's .hydra/ config was edited since the run (it names callables: "
                             "use only a config you trust); the config is rebuilt from .hydra/overrides.yaml and the "
                             "run's config dirs")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.config_dir, args.allow_edited_config, args.weights)
    except FinetuneError as exc:
        report_error(exc)
        return exc.exit_code
    print("  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()) + f"  ({result['samples']} samples)")
    print(f"wrote {args.run_dir / RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
