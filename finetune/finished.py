"""A finished run, rebuilt: its recorded config verified and composed again, model B built from it
and its `model.safetensors` loaded strictly. What `finetune-eval` and `finetune-export` start from.

A run directory's config names callables, so it is trusted like a script only while it is the one
the run recorded (`compose.check_saved_config` / `check_rebuilt_config`); `allow_edited_config`
turns a refusal into a warning, listed in `edited`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from finetune.errors import CheckpointError, RunDirError

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
WEIGHT_FILES = (WEIGHTS, EMA_WEIGHTS, "checkpoints/best.safetensors")  # the weights a run writes


@dataclass
class FinishedRun:
    run_dir: Path
    cfg: DictConfig  # the run's config, with the overrides given after the run's own
    model: object  # model B (with its lora ops), holding model.safetensors
    edits: list  # model.AppliedEdit of model.add
    weights: Path
    metadata: dict[str, str]  # what the run stored in the weights' metadata (session.provenance)
    edited: list[str] = field(default_factory=list)  # config edits accepted under allow_edited_config


def open_finished_run(run_dir: Path, overrides: Sequence[str] = (), config_dirs: Sequence[str] = (),
                      allow_edited_config: bool = False, weights_file: str = WEIGHTS) -> FinishedRun:
    """The run's config verified and rebuilt, its model built and loaded strictly (on the CPU).
    `weights_file`: which of the run's weights (WEIGHT_FILES), model.safetensors by default."""
    from safetensors.torch import load_file

    from finetune.compose import check_rebuilt_config, check_saved_config, read_recorded_run, rebuild_run_config
    from finetune.model import build_model
    from finetune.run_files import previous_status
    from finetune.session import seed_everything

    if weights_file not in WEIGHT_FILES:
        raise RunDirError(f"--weights {weights_file}: not one of the weights a run writes.",
                          f"use one of {', '.join(WEIGHT_FILES)}")
    run_dir = Path(run_dir)
    recorded = read_recorded_run(run_dir)
    weights = run_dir / weights_file
    if not weights.is_file():
        status = previous_status(run_dir)
        if weights_file != WEIGHTS and (run_dir / WEIGHTS).is_file():
            raise RunDirError(f"{run_dir} has no {weights_file}"
                              f"{' (the run had no trainer.ema)' if weights_file == EMA_WEIGHTS else ''}.",
                              f"evaluate {WEIGHTS}, or train with the setting that writes {weights_file}")
        raise RunDirError(f"{run_dir} has no {weights_file}: the run did not complete"
                          f"{f' (summary.json status: {status})' if status else ''}.",
                          "resume the run with the same command and hydra.run.dir, or use another run")
    metadata = recorded_metadata(weights)
    edited = check_saved_config(run_dir, metadata.get("config_sha256"), metadata.get("config"), allow_edited_config)
    as_run = rebuild_run_config(recorded, (), config_dirs)
    edited += check_rebuilt_config(run_dir, as_run, metadata.get("config"), allow_edited_config)
    cfg = rebuild_run_config(recorded, overrides, config_dirs) if overrides else as_run

    seed_everything(cfg.seed)
    model, edits = build_model(cfg.model)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_file} does not fit the model rebuilt from the config: {str(exc).splitlines()[0]}",
                              "do not override model.* for a finished run") from exc
    return FinishedRun(run_dir, cfg, model, edits, weights, metadata, edited)


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


def validation_loader(cfg: DictConfig, device):
    """The validation data of the run's config, in order, every sample once."""
    import torch

    from finetune.data import build_collate, build_dataset

    return torch.utils.data.DataLoader(
        build_dataset(cfg.data.val, "val"), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        collate_fn=build_collate(cfg.data.get("collate")), pin_memory=cfg.data.pin_memory and device.type == "cuda")
