"""Shared fixtures: a temp demo-data cache, Hydra's compose API over the packaged configs plus the
test configs (tests/conf), tiny models/data (tests/helpers/tiny.py) and tiny checkpoints."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest

TESTS = Path(__file__).resolve().parent
HELPERS = TESTS / "helpers"
TEST_CONF = TESTS / "conf"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

import finetune.config  # noqa: E402,F401  (registers the schema and the finetune_asset resolver)
import finetune.paths  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def finetune_cache(tmp_path_factory) -> Path:
    """Demo data is generated under a session temp dir, never in the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("finetune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(cache))
        mp.setenv("MPLBACKEND", "Agg")
        mp.delenv("HYDRA_FULL_ERROR", raising=False)
        yield cache


def compose_config(overrides: Sequence[str] = (), search: Sequence[Path] = (TEST_CONF,)):
    """Compose `config` from the packaged conf/ with Hydra's compose API (+ extra search paths)."""
    from hydra import compose, initialize_config_dir

    extra = []
    if search:
        extra = ["hydra.searchpath=[" + ",".join(f"file://{p}" for p in search) + "]"]
    with initialize_config_dir(config_dir=finetune.paths.config_dir(), version_base="1.3"):
        return compose("config", overrides=[*extra, *overrides])


@pytest.fixture
def compose() -> Callable:
    return compose_config


# ---- tiny checkpoints ------------------------------------------------------------------------


@dataclass
class TinyCheckpoints:
    state_dict: dict  # model A's tensors, plain keys
    safetensors: Path
    safetensors_module: Path  # every key prefixed with `module.` (saved from DDP)
    torch: Path
    torch_module: Path
    nested_state_dict: Path  # {"state_dict": sd, "epoch": 3}
    nested_model: Path  # {"model": sd, "optimizer": {...}}


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> TinyCheckpoints:
    import torch
    from safetensors.torch import save_file
    from tiny import tiny_state_dict

    root = tmp_path_factory.mktemp("tiny-ckpts")
    sd = tiny_state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    paths = TinyCheckpoints(
        state_dict=sd,
        safetensors=root / "a.safetensors",
        safetensors_module=root / "a_ddp.safetensors",
        torch=root / "a.pt",
        torch_module=root / "a_ddp.pt",
        nested_state_dict=root / "a_nested_sd.pt",
        nested_model=root / "a_nested_model.pt",
    )
    save_file(sd, str(paths.safetensors))
    save_file(prefixed, str(paths.safetensors_module))
    torch.save(sd, paths.torch)
    torch.save(prefixed, paths.torch_module)
    torch.save({"state_dict": sd, "epoch": 3}, paths.nested_state_dict)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "step": 10}, paths.nested_model)
    return paths


TINY_TRAIN = ["model=tiny", "data=tiny", "checkpoint=tiny", "trainer.epochs=2", "trainer.progress=false", "trainer.log_every=1"]


@pytest.fixture
def tiny_cfg(tiny_ckpts) -> Callable:
    """A composed config training model B (tiny) from the tiny model-A checkpoint; extra overrides win."""

    def make(*overrides: str, ckpt: Path | str | None = tiny_ckpts.safetensors):
        path = "null" if ckpt is None else str(ckpt)
        return compose_config([*TINY_TRAIN, f"checkpoint.path={path}", *overrides])

    return make


# ---- subprocess runs of the commands -----------------------------------------------------


@pytest.fixture
def cli_env(finetune_cache) -> dict:
    from command_line import command_env

    return command_env(finetune_cache)


@pytest.fixture
def cli(cli_env, tmp_path) -> Callable:
    """Run a command (`finetune`, `finetune-inspect`, `finetune-eval`, `finetune-summary`, or
    `python`) in a subprocess in a tmp cwd (helpers/command_line.py says how each is started)."""
    from command_line import command

    def run(name: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180):
        return subprocess.run([*command(name), *args], cwd=cwd or tmp_path, env=env or cli_env, capture_output=True,
                              text=True, timeout=timeout)

    return run
