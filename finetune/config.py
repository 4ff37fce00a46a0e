"""Structured-config schemas for every config group.

Hydra merges the YAML files of `conf/` (and of any `--config-dir`) into these dataclasses, so
an unknown key or a wrong type fails at compose time, in an override or inside a YAML file.
Code downstream receives a validated config and never re-reads YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class EditOp(Enum):
    replace = "replace"
    after = "after"
    before = "before"
    lora = "lora"


class CheckpointFormat(Enum):
    auto = "auto"
    torch = "torch"
    safetensors = "safetensors"
    lightning = "lightning"
    sharded = "sharded"


class ShapePolicy(Enum):
    error = "error"
    skip = "skip"
    adapt = "adapt"


class NewParams(Enum):
    train = "train"
    freeze = "freeze"


class NormMode(Enum):
    follow = "follow"
    freeze_stats = "freeze_stats"


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class MonitorMode(Enum):
    auto = "auto"  # trainer.mode: the task's; task.mode: the metric's own higher_is_better
    min = "min"
    max = "max"


class SavedWeights(Enum):
    final = "final"
    best = "best"


@dataclass
class ModuleEdit:
    """One entry of `model.add`: put `module` at / after / before the submodule `at`; or (op lora)
    give every Linear / Conv1d / Conv2d / Embedding / transformers Conv1D that the glob `at` matches
    a LoRA adapter (finetune/adapters.py)."""

    op: EditOp = EditOp.after
    at: str = "???"
    name: Optional[str] = None  # required for after/before: the new submodule's attribute name
    module: Any = None  # {_target_: ...}; not for lora
    # op lora only (null: the default shown); an error on the other ops
    rank: Optional[int] = None  # 8
    alpha: Optional[float] = None  # 16: the update is scaled by alpha / rank
    dropout: Optional[float] = None  # 0.0: dropout on the adapter's input
    dora: Optional[bool] = None  # false: true adds DoRA's magnitude vector


@dataclass
class ModelConfig:
    base: Any = None  # {_target_: ...}: any callable returning an nn.Module
    add: List[ModuleEdit] = field(default_factory=list)


@dataclass
class RemapRule:
    pattern: str = "???"  # regex, matched with re.search against each checkpoint key
    replace: str = ""  # re.sub replacement; groups as \1 or \g<name>


@dataclass
class ShapeOverride:
    """One entry of `checkpoint.shape_overrides`: the shape policy for the model keys it names."""

    keys: Any = MISSING  # an fnmatch glob over model keys, or a list of globs
    action: ShapePolicy = MISSING  # error | skip | adapt


@dataclass
class ExpectConfig:
    missing: Optional[List[str]] = None  # null: not declared; a list: exactly these may be missing
    unexpected: Optional[List[str]] = None
    # Fraction of the base model's parameters (not model.add's modules) that must load: below it the keys
    # do not line up and the run would train from scratch. 0 or null: no check.
    min_loaded: Optional[float] = 0.1
    # Model keys whose checkpoint values may hold NaN/Inf (e.g. a -inf attention mask buffer); any
    # other non-finite tensor in the checkpoint stops the run.
    nonfinite: List[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    # null = train from scratch; a list: the base weights, then files loaded over them (an adapter, ours or PEFT's)
    path: Any = None
    format: CheckpointFormat = CheckpointFormat.auto
    select: str = "auto"
    remap: List[RemapRule] = field(default_factory=list)
    ignore: List[str] = field(default_factory=list)
    auto_unwrap: bool = True
    on_shape_mismatch: ShapePolicy = ShapePolicy.error
    shape_overrides: List[ShapeOverride] = field(default_factory=list)  # first entry whose keys match wins
    low_memory: Any = "auto"  # auto | true | false (Any: YAML true/false are booleans)
    expect: ExpectConfig = field(default_factory=ExpectConfig)


@dataclass
class ParamGroupSpec:
    params: List[str] = field(default_factory=list)  # globs over parameter names
    lr_mult: float = 1.0
    weight_decay: Optional[float] = None  # null: the optimizer's own


@dataclass
class UnfreezeStep:
    at_epoch: Optional[int] = None
    at_step: Optional[int] = None
    params: List[str] = field(default_factory=list)
    lr_mult: float = 1.0


@dataclass
class PolicyConfig:
    freeze: List[str] = field(default_factory=list)
    train: List[str] = field(default_factory=list)
    new: NewParams = NewParams.train
    new_lr_mult: float = 1.0  # lr multiplier of new parameters not named in policy.groups (e.g. 10 for a new head)
    bn: NormMode = NormMode.follow
    groups: List[ParamGroupSpec] = field(default_factory=list)
    unfreeze: List[UnfreezeStep] = field(default_factory=list)
    allow_no_grad: List[str] = field(default_factory=list)  # trainable params allowed to get no gradient
    decay_norm_and_bias: bool = False  # false: biases and 1-D (norm) weights get weight_decay 0
    # Layer-wise lr decay: lr × layer_decay^(max_depth − depth) (e.g. 0.75); null: off. New parameters have no
    # depth: they keep new_lr_mult. The depth: from layer_groups if given, else the model's group_matcher (timm),
    # else the order of its top-level modules (blocks of a container split).
    layer_decay: Optional[float] = None
    layer_groups: List[str] = field(default_factory=list)  # regexes over parameter names, input to output


@dataclass
class DataConfig:
    root: Optional[str] = MISSING  # a base folder that dataset configs interpolate (${..root}); ??? until set
    # The base model's input normalisation, for transform configs to interpolate (${..mean}).
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet's
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    train: Any = None  # {_target_: ...} returning a torch Dataset of (input, target)
    val: Any = None
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    collate: Any = None  # {_target_: ...} returning a collate_fn(list of samples) -> batch; null: torch's default
    # {_target_: ...}: a callable applied to each training batch on the device, e.g. torchvision.transforms.v2's
    # MixUp / CutMix (or a RandomChoice of both); never to validation batches. null: none.
    batch_transform: Any = None
    num_classes: Optional[int] = None  # the data's number of classes, for configs to interpolate (${data.num_classes})
    skip_bad_samples: bool = False  # an unreadable sample (corrupt image): false stops naming the file; true skips and counts it
    tokenizer: Optional[str] = None  # text data: a tokenizer directory or tokenizer.json, for configs to interpolate
    max_length: Optional[int] = None  # text data: tokens per sequence, for configs to interpolate


@dataclass
class OptimConfig:
    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
    )
    scheduler: Any = None  # {_target_: ..., _partial_: true}, stepped once per optimizer step


@dataclass
class EmaConfig:
    """trainer.ema: an exponential moving average of the weights (timm's ModelEmaV3), evaluated beside them."""

    decay: float = 0.999  # ema <- decay * ema + (1 - decay) * weights, after every every_n_steps optimizer steps
    # null or 0: no warm-up (the first update, at step 1, copies the weights, as in timm). N: timm's warm-up
    # 1 - (1 + step / gamma) ** (-2/3), capped at decay, with gamma such that the cap is reached at step N.
    warmup_steps: Optional[int] = None
    every_n_steps: int = 1
    device: Optional[str] = None  # null: the model's device; cpu: keep the average off the accelerator


@dataclass
class EarlyStopConfig:
    """trainer.early_stop: stop when trainer.monitor has not improved for `patience` epochs."""

    patience: int = 3  # epochs without an improvement of at least min_delta
    min_delta: float = 0.0  # in the units of the monitored metric, in the direction of trainer.mode


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: Optional[int] = None
    device: str = "auto"
    precision: Precision = Precision.fp32
    grad_accum: int = 1
    clip_grad_norm: Optional[float] = None
    monitor: str = "auto"  # auto: the task's primary metric (task.monitor); else a val/<name> the task logs
    mode: MonitorMode = MonitorMode.auto  # auto: the direction of the monitored metric
    resume: str = "auto"  # auto | never | PATH to a checkpoints/last.pt
    progress: bool = True
    log_every: int = 10  # optimizer steps between logged train loss values
    checkpoint_every: Optional[int] = None  # optimizer steps; every epoch regardless
    channels_last: bool = False  # convolution nets in NHWC memory format (often faster on GPU)
    compile: bool = False  # torch.compile the model's forward (in place: state_dict keys keep their names)
    save: SavedWeights = SavedWeights.final  # what model.safetensors holds: the final or the best epoch's weights
    skip_nonfinite: bool = False  # skip batches whose loss is NaN/Inf instead of stopping (a sync per batch)
    # Older switch, kept: false turns TensorBoard off, true on (even if `logger` does not list it);
    # null: as `logger` says (listed: on when the tensorboard package is installed).
    tensorboard: Optional[bool] = None
    nproc: int = 1  # >1: DDP over that many processes on this machine, spawned from this run (gloo on CPU)
    # With lora ops: the merged weights and the PEFT adapter are run over the validation data beside the
    # trained model; each passes when its largest output difference is within this fraction of the output scale.
    export_tolerance: float = 1e-4
    ema: Any = None  # {decay, warmup_steps, every_n_steps, device}: val/ema/<metric>, model_ema.safetensors
    early_stop: Any = None  # {patience, min_delta} on trainer.monitor; summary.json stopped_early


@dataclass
class TaskConfig:
    """How a batch becomes model inputs, a loss and metric updates (finetune/task.py)."""

    inputs: Any = "auto"  # auto | an index | a key | a list of keys (keywords) or indices (positional)
    target: Any = "auto"  # auto: 2nd element of a tuple batch, `labels` of a dict batch; an index | a key | null
    prediction: Any = "auto"  # auto: the output tensor, else its `logits`, else its `out`; or a name / an index
    loss: Any = field(default_factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})  # null: the model's own
    metrics: Dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ...}, logged as val/<name>
    shift_labels: bool = False  # causal LM: prediction at position t is scored against the target at t + 1
    monitor: Optional[str] = None  # what trainer.monitor=auto picks; null: the first metric, else val/loss
    mode: MonitorMode = MonitorMode.auto  # its direction; auto: the metric's higher_is_better (loss: min)


@dataclass
class CsvLoggerConfig:
    """logger.csv: no settings. metrics.csv is always written, listed or not (curves.png, sweep
    summaries and scripts read it)."""


@dataclass
class TensorBoardLoggerConfig:
    enabled: bool = False  # true when `logger` lists tensorboard (conf/logger/tensorboard.yaml sets it)
    flush_secs: int = 120  # how often events reach the disk (SummaryWriter's flush_secs)


@dataclass
class MlflowLoggerConfig:
    """logger.mlflow (finetune/tracking.py): params, metrics, reports and status of the run in MLflow."""

    enabled: bool = False  # true when `logger` lists mlflow (conf/logger/mlflow.yaml sets it)
    tracking_uri: Optional[str] = None  # null: sqlite:///<output root>/mlflow.db (the directory finetune started in)
    experiment_name: str = "finetune"
    run_name: Optional[str] = None  # null: the run directory (a sweep job: its number and overrides)
    tags: Dict[str, str] = field(default_factory=dict)
    artifact_location: Optional[str] = None  # a new experiment's; null: mlartifacts/ beside a sqlite file, else the server's
    flush_every_s: float = 5.0  # metrics are sent in batches at most this often (a background thread)
    close_timeout_s: float = 60.0  # the end of a run waits at most this long for MLflow, then warns and goes on


@dataclass
class LoggerConfig:
    """The `logger` group (conf/logger, several at once): each one's settings; a file listed in
    `logger` sets its `enabled`. Settings of one not enabled are refused (check_loggers)."""

    csv: CsvLoggerConfig = field(default_factory=CsvLoggerConfig)
    tensorboard: TensorBoardLoggerConfig = field(default_factory=TensorBoardLoggerConfig)
    mlflow: MlflowLoggerConfig = field(default_factory=MlflowLoggerConfig)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    dry_run: bool = False
    dry_run_batches: int = 1  # a dry run passes this many training batches forward and backward; 0: load only


def check_no_additions(cfg, schema: type = None, where: str = "") -> None:
    """Refuse keys the schema does not have. Hydra's `+group.key=value` (the fix its own message
    suggests for an unknown key) adds a key even to a structured config; a schema'd group must not
    take one silently (`+trainer.loss=mse` would be accepted and ignored). Nodes typed Any
    (`model.base`, `data.train`, `task.loss`, ...) hold the user's own keys and are not checked."""
    import dataclasses
    import typing

    from omegaconf import DictConfig, ListConfig

    from finetune.errors import ConfigError

    schema = schema or FinetuneConfig
    if not isinstance(cfg, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        if key not in hints:
            group = where or "the top level"
            raise ConfigError(
                f"{where + '.' if where else ''}{key} is not a key of {group} (its keys: {', '.join(names)}).",
                f"remove the override `+{where + '.' if where else ''}{key}=...` or the key from your YAML, "
                "or use one of those keys (README.md, Config reference)")
        node = cfg._get_node(key)
        kind = hints[key]
        name = f"{where}.{key}" if where else str(key)
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            check_no_additions(node, kind, name)
        elif typing.get_origin(kind) in (list, typing.List) and args and dataclasses.is_dataclass(args[0]) \
                and isinstance(node, ListConfig):
            for i, item in enumerate(node):
                check_no_additions(item, args[0], f"{name}[{i}]")


def ema_settings(value) -> EmaConfig | None:
    """trainer.ema as its schema (null: off). A number is the decay alone (`trainer.ema=0.999`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"decay": value}
    settings = typed_settings("trainer.ema", value, EmaConfig, "trainer.ema={decay: 0.999, warmup_steps: 100}")
    if settings is not None:
        from finetune.errors import ConfigError

        if not 0.0 <= settings.decay < 1.0:
            raise ConfigError(f"trainer.ema.decay={settings.decay} is outside [0, 1).", "use e.g. 0.999 (closer to 1: a longer memory)")
        if settings.every_n_steps < 1 or (settings.warmup_steps or 0) < 0:
            raise ConfigError(f"trainer.ema: every_n_steps={settings.every_n_steps}, warmup_steps={settings.warmup_steps}.",
                              "every_n_steps is 1 or more; warmup_steps is null, 0 or more")
    return settings


def early_stop_settings(value) -> EarlyStopConfig | None:
    """trainer.early_stop as its schema (null: off). A number is the patience alone (`trainer.early_stop=3`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"patience": value}
    settings = typed_settings("trainer.early_stop", value, EarlyStopConfig, "trainer.early_stop={patience: 3, min_delta: 0.001}")
    if settings is not None and (settings.patience < 1 or settings.min_delta < 0):
        from finetune.errors import ConfigError

        raise ConfigError(f"trainer.early_stop: patience={settings.patience}, min_delta={settings.min_delta}.",
                          "patience is 1 or more epochs; min_delta is 0 or more")
    return settings


def typed_settings(key: str, value, schema: type, example: str):
    """A node typed Any (so that an override can set it from null) checked against its schema:
    an unknown key or a wrong type is one ConfigError naming the keys."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from finetune.errors import ConfigError

    if value is None:
        return None
    names = ", ".join(f.name for f in dataclasses.fields(schema))
    if not isinstance(value, (dict, DictConfig)):
        raise ConfigError(f"{key}={value!r} is not a mapping of {names}.", f"write it as {example} (or null: off)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]} (its keys: {names}).", f"write it as {example}") from None
    return OmegaConf.to_object(merged)


def check_loggers(logger) -> None:
    """Settings given to a logger that `logger` does not list would be ignored: refuse them."""
    from omegaconf import OmegaConf

    from finetune.errors import ConfigError

    for name, schema in (("tensorboard", TensorBoardLoggerConfig), ("mlflow", MlflowLoggerConfig)):
        settings = logger[name]
        if settings.enabled:
            continue
        given = OmegaConf.to_container(settings, resolve=False)
        changed = [key for key, value in given.items() if value != getattr(schema(), key)]
        if changed:
            raise ConfigError(
                f"logger.{name}.{changed[0]} is set but `logger` does not list {name}: the setting would be ignored.",
                f"add it to the list, e.g. logger=[csv,{name}] (or drop the logger.{name}.* overrides)")


def register_configs() -> None:
    """Register the schema as `finetune_schema` (conf/config.yaml lists it first in its defaults)
    and the resolvers: `finetune_asset` (the path of a file shipped with the package) and
    `finetune_unique_dir` (a run or sweep directory no other process holds) and
    `finetune_direction` (trainer.mode as an Optuna direction)."""
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)
    if not OmegaConf.has_resolver("finetune_asset"):
        from finetune.demo import asset

        OmegaConf.register_new_resolver("finetune_asset", asset)
    if not OmegaConf.has_resolver("finetune_unique_dir"):
        from finetune.paths import reserve_dir

        OmegaConf.register_new_resolver("finetune_unique_dir", reserve_dir, use_cache=True)
    if not OmegaConf.has_resolver("finetune_direction"):
        OmegaConf.register_new_resolver("finetune_direction", optuna_direction)


def optuna_direction(mode, task_mode="auto") -> str:
    """trainer.mode (max | min; auto: the task's task.mode) as an Optuna study direction."""
    mode = str(getattr(mode, "value", mode))
    if mode == "auto":
        mode = str(getattr(task_mode, "value", task_mode))
    if mode not in ("max", "min"):
        from finetune.errors import ConfigError

        raise ConfigError("the Optuna sweeper needs a direction, and trainer.mode and task.mode are both auto.",
                          "set trainer.mode=max or trainer.mode=min")
    return "minimize" if mode == "min" else "maximize"


register_configs()
