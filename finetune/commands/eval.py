"""`finetune-eval RUN_DIR [overrides] [--config-dir DIR]`: rebuild the run's config with Hydra's
compose API from what its .hydra/ recorded (overrides, the config dirs it used), load its
model.safetensors strictly, evaluate on the validation data, and write RUN_DIR/eval.json as
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
from finetune.errors import CheckpointError, FinetuneError, RunDirError

WEIGHTS = "model.safetensors"
RESULT = "eval.json"


def evaluate_run(run_dir: Path, overrides: list[str] = (), config_dirs: list[str] = (),
                 allow_edited_config: bool = False) -> dict:
    """Evaluate a finished run; returns what it writes to RUN_DIR/eval.json. The run's recorded
    config is verified before anything is composed or built from it (`allow_edited_config`: an
    edited one is used with a warning, recorded in eval.json as `edited_config`)."""
    import torch
    from safetensors.torch import load_file

    from finetune.compose import check_rebuilt_config, check_saved_config, read_recorded_run, rebuild_run_config
    from finetune.data import build_collate, build_dataset
    from finetune.loop import evaluate
    from finetune.model import build_model, pick_device
    from finetune.run_files import previous_status
    from finetune.session import seed_everything
    from finetune.state import write_json
    from finetune.task import Task

    run_dir = Path(run_dir)
    recorded = read_recorded_run(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        status = previous_status(run_dir)
        raise RunDirError(f"{run_dir} has no {WEIGHTS}: the run did not complete"
                          f"{f' (summary.json status: {status})' if status else ''}.",
                          "resume the run with the same command and hydra.run.dir, or evaluate another run")
    metadata = recorded_metadata(weights)
    edited = check_saved_config(run_dir, metadata.get("config_sha256"), metadata.get("config"), allow_edited_config)
    as_run = rebuild_run_config(recorded, (), config_dirs)
    edited += check_rebuilt_config(run_dir, as_run, metadata.get("config"), allow_edited_config)
    cfg = rebuild_run_config(recorded, overrides, config_dirs) if overrides else as_run

    seed_everything(cfg.seed)
    model, _ = build_model(cfg.model)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{WEIGHTS} does not fit the model rebuilt from the config: {str(exc).splitlines()[0]}",
                              "do not override model.* when evaluating a run") from exc
    device = pick_device(cfg.trainer.device)
    model.to(device)
    task = Task.from_config(cfg.task).to(device)
    loader = torch.utils.data.DataLoader(
        build_dataset(cfg.data.val, "val"), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        collate_fn=build_collate(cfg.data.get("collate")), pin_memory=cfg.data.pin_memory and device.type == "cuda")
    metrics = evaluate(model, loader, task, device, cfg.trainer.precision)
    result = {"metrics": {f"val/{name}": value for name, value in metrics.items()}, "weights": str(weights),
              "samples": len(loader.dataset), "overrides": list(overrides), "config_dirs": list(config_dirs)}
    if edited:
        result["edited_config"] = edited
    write_json(run_dir / RESULT, result)
    return result


def recorded_metadata(weights: Path) -> dict[str, str]:
    """What the run stored in its weights' metadata (finetune.session.provenance): the resolved
    `config` and `config_sha256`, the digest of `.hydra/config.yaml` as the run started."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}",
                              "the run's weights are damaged: resume or rerun the run") from exc


def recorded_config(weights: Path) -> str | None:
    """The resolved config the run stored in its weights' metadata (finetune.session.provenance)."""
    return recorded_metadata(weights).get("config")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*",
                        help="after the run's own: key=value (data.batch_size=256) or group=name (data=imagefolder)")
    parser.add_argument("--config-dir", action="append", default=[],
                        help="a directory of your own configs, searched before the ones the run used (repeatable)")
    parser.add_argument("--allow-edited-config", action="store_true",
                        help="evaluate even though the run's .hydra/ config was edited since the run (it names callables: "
                             "use only a config you trust); the config is rebuilt from .hydra/overrides.yaml and the "
                             "run's config dirs")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.config_dir, args.allow_edited_config)
    except FinetuneError as exc:
        report_error(exc)
        return exc.exit_code
    print("  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()) + f"  ({result['samples']} samples)")
    print(f"wrote {args.run_dir / RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
