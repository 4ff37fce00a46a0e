"""Configs composed with Hydra's compose API outside a Hydra run.

`compose_config` composes the packaged configs plus the user's config directories (what
`finetune --config-dir DIR` / `hydra.searchpath` see). `rebuild_run_config` rebuilds a finished
run's config from what its `.hydra/` recorded: the primary config's name, the config sources the
user added (`--config-dir`, `hydra.searchpath`) and the run's overrides, with more overrides
appended. `check_recorded_config` refuses a run directory whose config no longer matches the one
its weights were trained with (a run directory's config names callables: it is trusted like a
script, so it must be the one the run recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from finetune import config as _config  # noqa: F401  (registers the schema and the resolvers)
from finetune.errors import ConfigError, RunDirError
from finetune.paths import config_dir

# Config sources Hydra records that are not the user's: Hydra's own, the primary (packaged) one,
# and the structured-config store.
_NOT_USER_SOURCES = {"hydra", "main", "schema"}


def as_search_path_entry(directory: str) -> str:
    """`DIR` -> `file:///abs/DIR`; entries that already name a scheme (`pkg://`, `file://`) stay."""
    return directory if "://" in directory else f"file://{Path(directory).expanduser().resolve()}"


def compose_config(overrides: Sequence[str] = (), search_path: Sequence[str] = (),
                   config_name: str = "config") -> DictConfig:
    """The packaged configs (+ `search_path` entries, in order, after them as Hydra puts them) with
    `overrides` applied. Hydra's composition errors become a ConfigError carrying its message."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    extra = [f"hydra.searchpath=[{','.join(search_path)}]"] if search_path else []
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name, overrides=[*extra, *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose the config: {exc}",
                          "check the overrides and the config names against `finetune --help` and README.md") from exc
    _config.check_no_additions(cfg)
    return cfg


# ---- a finished run ----------------------------------------------------------------------------


@dataclass
class RecordedRun:
    """What a run's `.hydra/` says about how its config was composed."""

    run_dir: Path
    config_name: str  # the primary config (hydra.job.config_name)
    overrides: list[str]  # the run's own overrides (.hydra/overrides.yaml), in order
    search_path: list[str]  # the config sources the user added, in Hydra's order (file://..., pkg://...)

    def missing_dirs(self) -> list[str]:
        return [entry for entry in self.search_path
                if entry.startswith("file://") and not Path(entry.removeprefix("file://")).is_dir()]


def read_recorded_run(run_dir: Path) -> RecordedRun:
    hydra_dir = Path(run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} has no .hydra/config.yaml: it is not a finetune run directory.",
                          "pass the directory a `finetune` run wrote (outputs/DATE/TIME, or a job dir of a multirun)")
    hydra_cfg = (_read_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra") or {}
    overrides = _read_yaml(hydra_dir / "overrides.yaml")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise RunDirError(f"{hydra_dir / 'overrides.yaml'} is missing or not a list of overrides.",
                          "pass a run directory that Hydra wrote completely (.hydra/ holds config.yaml, hydra.yaml, overrides.yaml)")
    sources = (hydra_cfg.get("runtime") or {}).get("config_sources") or []
    search_path = [f"{s['schema']}://{s['path']}" for s in sources
                   if isinstance(s, dict) and s.get("provider") not in _NOT_USER_SOURCES and s.get("path")]
    config_name = (hydra_cfg.get("job") or {}).get("config_name") or "config"
    return RecordedRun(Path(run_dir), config_name, overrides, search_path)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError:
        return None
    except yaml.YAMLError as exc:
        raise RunDirError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}",
                          "restore the file Hydra wrote, or evaluate another run") from exc


def merge_overrides(run_overrides: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The run's overrides, then `extra`; an extra override of a key the run set replaces the run's.

    A group override (`data=other`) replaces the run's choice for that group, and the run's own
    overrides inside it (`data.batch_size=...`) go with it: they were meant for the other group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        run_parsed = parser.parse_overrides(list(run_overrides))
        extra_parsed = parser.parse_overrides(list(extra))
    except HydraException as exc:
        raise ConfigError(f"invalid override: {exc}",
                          "write overrides as key=value or group=name, e.g. data.batch_size=128 data=fake") from exc
    replaced = {_key(o) for o in extra_parsed}
    # A top-level `name=value` may choose a group; a plain value (seed=1) has nothing inside it to drop.
    groups = {o.key_or_group for o in extra_parsed if "." not in o.key_or_group}
    added = {_key(o) for o in run_parsed if o.is_add() or o.is_force_add()}
    kept = [text for text, o in zip(run_overrides, run_parsed)
            if _key(o) not in replaced and not _inside(o.key_or_group, groups)]
    appended = []
    for text, o in zip(extra, extra_parsed):
        if _key(o) in added and not (o.is_add() or o.is_force_add() or o.is_delete()):
            # the key exists only because the run added it (`+key=v0`): set it whether or not it exists
            text = f"++{text}" if "." in o.key_or_group else f"+{text}"
        appended.append(text)
    return [*kept, *appended]


def _key(override) -> str:
    """What an override sets, without its +/++/~ prefix: `data.batch_size`, `data`, `data@pkg`."""
    return override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"


def _inside(key: str, groups: set[str]) -> bool:
    """`data.batch_size` is inside `data`."""
    return "." in key and key.split(".", 1)[0] in groups


def rebuild_run_config(recorded: RecordedRun, overrides: Sequence[str] = (),
                       config_dirs: Sequence[str] = ()) -> DictConfig:
    """The run's config composed again, with `overrides` after the run's own. `config_dirs` are
    searched before the dirs the run used (and replace the ones that no longer exist)."""
    search_path = [as_search_path_entry(d) for d in config_dirs]
    missing = recorded.missing_dirs()
    search_path += [e for e in recorded.search_path if e not in search_path and e not in missing]
    try:
        return compose_config(merge_overrides(recorded.overrides, overrides), search_path, recorded.config_name)
    except ConfigError as exc:
        if missing and not config_dirs:
            gone = ", ".join(e.removeprefix("file://") for e in missing)
            raise ConfigError(f"{exc.problem} (the run used config dir(s) that no longer exist: {gone})",
                              "pass the directory that holds those configs now with --config-dir DIR") from exc
        raise


# ---- provenance -------------------------------------------------------------------------------


def check_recorded_config(run_dir: Path, rebuilt: DictConfig, recorded_yaml: str | None) -> None:
    """Refuse unless the rebuilt config and `.hydra/config.yaml` are the config the run trained
    with (`recorded_yaml`: the resolved config stored in its model.safetensors)."""
    run_dir = Path(run_dir)
    if not recorded_yaml:
        raise RunDirError(f"{run_dir / 'model.safetensors'} records no config: the run's config cannot be verified.",
                          "evaluate a run that finetune trained (its weights carry the config they were trained with)")
    recorded = yaml.safe_load(recorded_yaml)
    saved_file = run_dir / ".hydra" / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True, enum_to_str=True)
    except Exception as exc:  # an edited file can fail in any way while being resolved
        raise RunDirError(f"{saved_file} cannot be read back: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          "restore the file the run wrote, or evaluate another run") from exc
    changed = differing_keys(recorded, _plain(saved))
    if changed:
        raise RunDirError(
            f"{saved_file} does not match the config the run trained with (recorded in model.safetensors): "
            f"it differs at {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. It was edited after the run.",
            "restore the run's .hydra/ as the run wrote it, or start a new run with the config you want",
        )
    changed = differing_keys(recorded, yaml.safe_load(OmegaConf.to_yaml(rebuilt, resolve=True)))
    if changed:
        raise RunDirError(
            f"rebuilding the config of {run_dir} from .hydra/overrides.yaml and its config dirs gives a config other than "
            f"the one the run trained with: it differs at {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. "
            "The overrides were edited, or a config file the run used has changed since.",
            "restore the configs the run used (or pass the directory holding them with --config-dir), or start a new run",
        )


def _plain(container: Any) -> Any:
    """Through YAML and back, so both sides compare as the same plain types."""
    return yaml.safe_load(yaml.safe_dump(container, sort_keys=False))


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts/lists differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in [*a, *(k for k in b if k not in a)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(name)
            else:
                out += differing_keys(a[key], b[key], name)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in differing_keys(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [prefix or "(the whole config)"]
