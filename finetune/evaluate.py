"""finetune-eval RUN_DIR [overrides]: rebuild the run's model from its saved config, load its
model.safetensors strictly, evaluate on the configured (or overridden) validation data, and
write RUN_DIR/eval.json as {"metrics": {...}, ...}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError


def load_run_config(run_dir: Path, overrides: list[str], config_dirs: list[str]):
    """The run's .hydra/config.yaml validated by the schema, with overrides applied.

    `key.path=value` sets a value; `group=name` (e.g. data=fake) replaces a whole group with
    conf/<group>/<name>.yaml from the packaged configs or a --config-dir.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from finetune.config import FinetuneConfig
    from finetune.paths import config_dir

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} has no .hydra/config.yaml: it is not a finetune run directory.",
                          "pass the directory a `finetune` run wrote (outputs/DATE/TIME)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), OmegaConf.load(saved))
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ConfigError(f"override {override!r} is not key=value.", "e.g. data.batch_size=128 or data=fake")
            if "." not in key and key in cfg and OmegaConf.is_dict(cfg[key]):
                found = [Path(d) / key / f"{value}.yaml" for d in [*config_dirs, config_dir()]]
                found = [f for f in found if f.is_file()]
                if not found:
                    raise ConfigError(f"no config {key}/{value}.yaml in {[*config_dirs, config_dir()]}.", f"check the name, or pass --config-dir")
                node = OmegaConf.load(found[0])
                node.pop("defaults", None)
                cfg[key] = OmegaConf.merge(OmegaConf.structured(type(OmegaConf.to_object(cfg[key]))), node)
            else:
                cfg.merge_with(OmegaConf.from_dotlist([override]))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config or override: {exc}".splitlines()[0], "check the key names against the config reference in README.md") from exc
    return cfg


def evaluate_run(run_dir: Path, overrides: list[str], config_dirs: list[str] = ()) -> dict:
    import torch
    from safetensors.torch import load_file

    from finetune.data import build_dataset
    from finetune.loop import evaluate
    from finetune.model import build_model, pick_device
    from finetune.state import write_json

    cfg = load_run_config(run_dir, overrides, list(config_dirs))
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FinetuneError(f"{run_dir} has no model.safetensors (the run did not complete).",
                            "resume the run with the same command and hydra.run.dir, or evaluate another run")
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FinetuneError(f"model.safetensors does not fit the model rebuilt from the config: {str(exc).splitlines()[0]}",
                            "do not override model.* when evaluating a run") from exc
    device = pick_device(cfg.trainer.device)
    model.to(device)
    loader = torch.utils.data.DataLoader(build_dataset(cfg.data.val, "val"), batch_size=cfg.data.batch_size,
                                         num_workers=cfg.data.num_workers)
    metrics = evaluate(model, loader, device, cfg.trainer.precision)
    result = {"metrics": {f"val/{k}": v for k, v in metrics.items()}, "weights": str(weights),
              "samples": len(loader.dataset), "overrides": overrides}
    write_json(run_dir / "eval.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    from finetune import config as _config  # noqa: F401  (resolvers)

    parser = argparse.ArgumentParser(prog="finetune-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value or group=name (e.g. data=imagefolder data.root=...)")
    parser.add_argument("--config-dir", action="append", default=[], help="a directory of your own configs")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.config_dir)
    except FinetuneError as exc:
        from finetune.cli import report_error

        report_error(exc)
        return exc.exit_code
    print("  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()) + f"  ({result['samples']} samples)")
    print(f"wrote {args.run_dir / 'eval.json'}")
    return 0
