"""Configs through Hydra's compose API: every shipped option composes; the schemas reject typos and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import finetune.paths
from finetune.config import CheckpointConfig, FinetuneConfig, ModelConfig, PolicyConfig, ShapePolicy, TrainerConfig

CONF = Path(finetune.paths.config_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
COMPOSE_ERRORS = (ConfigCompositionException, OmegaConfBaseException)


def is_subset(expected, actual) -> bool:
    """Every key/value of the YAML file is in the composed config (which adds schema defaults)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and is_subset(v, actual[k]) for k, v in expected.items())
    if expected == "???":  # mandatory: checked by test_mandatory_value_stays_mandatory
        return True
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(is_subset, expected, actual))
    return expected == actual


def test_the_shipped_groups_are_found():
    assert {"model", "checkpoint", "data", "optim", "policy", "trainer"} <= set(GROUPS)
    assert len(OPTIONS) >= 12


def test_default_config_composes(compose):
    cfg = compose([], search=())
    assert cfg.model.base._target_ == "finetune.demo.net.DemoNet"
    assert [e.op.value for e in cfg.model.add] == ["replace", "after"]
    # The demo's checkpoint config is its path: model.add declares the rest (nothing leaks into a user's run).
    assert cfg.checkpoint.on_shape_mismatch is ShapePolicy.error and list(cfg.checkpoint.remap) == []
    assert Path(cfg.checkpoint.path).is_file()  # the finetune_asset resolver finds the packaged checkpoint
    assert cfg.checkpoint.expect.missing is None and cfg.checkpoint.expect.unexpected is None
    assert cfg.checkpoint.expect.min_loaded == 0.1
    assert cfg.data.train._target_ == "finetune.demo.data.shapes_task_b"
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.trainer.monitor == "auto" and cfg.task.monitor == "val/acc"  # auto: the task's primary metric
    assert cfg.seed == 0 and cfg.dry_run is False
    # Validated by the schema: each group is backed by its dataclass.
    assert OmegaConf.get_type(cfg.trainer) is TrainerConfig
    assert OmegaConf.get_type(cfg.checkpoint) is CheckpointConfig
    assert OmegaConf.get_type(cfg.model) is ModelConfig
    assert OmegaConf.get_type(cfg.policy) is PolicyConfig
    assert set(cfg) >= set(FinetuneConfig.__dataclass_fields__)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"], search=())
    expected = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    if group == "experiment":  # `# @package _global_`: its keys land at the top level, its defaults choose groups
        expected.pop("defaults", None)
        actual = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    else:
        actual = OmegaConf.to_container(cfg[group], resolve=False, enum_to_str=True)
    assert is_subset(expected, actual), (expected, actual)


def test_mandatory_value_stays_mandatory(compose):
    cfg = compose(["data=imagefolder"], search=())
    assert OmegaConf.is_missing(cfg.data, "root")


def test_hydra_job_logging_option_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/job_logging=finetune"], return_hydra_config=True)
    assert cfg.hydra.job_logging.formatters.console["()"] == "finetune.logs.ConsoleFormatter"


@pytest.mark.parametrize(
    "override",
    [
        "trainer.epochz=3",  # unknown key
        "checkpoint.remapp=[]",
        "trainer.epochs=abc",  # wrong type
        "seed=zero",
        "dry_run=maybe",
        "checkpoint.on_shape_mismatch=ignore",  # not one of error|skip|adapt
        "checkpoint.shape_overrides=[{keys: 'head.*', action: interpolate}]",  # same, per key
        "checkpoint.shape_overrides=[{glob: 'head.*', action: skip}]",  # unknown key in an entry
        "checkpoint.shape_overrides={keys: 'head.*', action: skip}",  # a list of entries, not one
        "policy.new=sometimes",
        "trainer.precision=fp8",
        "checkpoint.expect.missing=notalist",
        "model=nonexistent_option",
    ],
)
def test_bad_override_fails_at_compose_time(compose, override):
    with pytest.raises(COMPOSE_ERRORS):
        compose([override], search=())


def test_shape_overrides_compose_typed(compose):
    cfg = compose(["checkpoint.shape_overrides=[{keys: 'head.*', action: adapt}, {keys: [pos_embed, 'cls_*'], action: skip}]"],
                  search=())
    first, second = cfg.checkpoint.shape_overrides
    assert first["keys"] == "head.*" and first.action is ShapePolicy.adapt
    assert list(second["keys"]) == ["pos_embed", "cls_*"] and second.action is ShapePolicy.skip
    assert list(compose([], search=()).checkpoint.shape_overrides) == []


def test_good_overrides_are_typed(compose):
    cfg = compose(["trainer.epochs=5", "checkpoint.on_shape_mismatch=adapt", "policy.freeze=[layer1,stem]"], search=())
    assert cfg.trainer.epochs == 5 and cfg.checkpoint.on_shape_mismatch is ShapePolicy.adapt
    assert list(cfg.policy.freeze) == ["layer1", "stem"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_user_config_dir_option_composes(compose, tmp_path):
    write(tmp_path / "model" / "mine.yaml", "base: {_target_: tiny.TinyNet}\nadd: []\n")
    cfg = compose(["model=mine"], search=(tmp_path,))
    assert cfg.model.base._target_ == "tiny.TinyNet"


@pytest.mark.parametrize(
    "group, text",
    [
        ("model", "base: {_target_: tiny.TinyNet}\nbogus: 1\n"),  # unknown top-level key
        ("model", "base: {_target_: tiny.TinyNet}\nadd:\n  - {op: replace, at: head, modul: {_target_: torch.nn.Identity}}\n"),
        ("model", "base: {_target_: tiny.TinyNet}\nadd:\n  - {op: insert, at: head, module: {_target_: torch.nn.Identity}}\n"),
        ("trainer", "epochs: many\n"),  # wrong type inside a file
        ("checkpoint", "path: x.pt\nexpect: {missing: [a], unexpectd: []}\n"),
        ("policy", "freeze: ['*']\ngroups: [{params: [fc], lr_mul: 10}]\n"),
    ],
    ids=["model-key", "add-entry-key", "add-op-value", "trainer-type", "expect-key", "group-key"],
)
def test_unknown_key_or_wrong_type_in_user_yaml_fails(compose, tmp_path, group, text):
    write(tmp_path / group / "bad.yaml", text)
    with pytest.raises(COMPOSE_ERRORS):
        compose([f"{group}=bad"], search=(tmp_path,))


def test_test_configs_compose(compose, tiny_ckpts):
    cfg = compose(["model=tiny", "data=tiny", "checkpoint=tiny", f"checkpoint.path={tiny_ckpts.safetensors}"])
    assert cfg.model.add[1].name == "adapter1" and cfg.data.batch_size == 16


@pytest.mark.parametrize("override, named", [
    ("+trainer.loss=mse", "trainer.loss is not a key of trainer"),
    ("+foo=1", "foo is not a key of the top level"),
    ("+checkpoint.expect.extra=[]", "checkpoint.expect.extra is not a key of checkpoint.expect"),
])
def test_an_added_key_in_a_schemad_group_is_refused(compose, override, named):
    from finetune.config import check_no_additions
    from finetune.errors import ConfigError

    cfg = compose([override])  # Hydra's `+` adds it even to a structured config
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as caught:
        check_no_additions(cfg)
    assert "its keys:" in caught.value.problem


def test_keys_of_the_users_own_nodes_may_be_added(compose):
    from finetune.config import check_no_additions

    check_no_additions(compose(["+data.train.delay=0.01", "+model.base.extra=1"]))  # Any-typed nodes: the user's


def test_an_added_key_stops_the_run_before_it_writes(compose, tmp_path):
    from finetune.errors import ConfigError
    from finetune.run import run

    with pytest.raises(ConfigError, match="trainer.loss"):
        run(compose(["+trainer.loss=mse", "dry_run=true"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
