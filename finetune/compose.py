"""Configs composed with Hydra's compose API outside a Hydra run.

`compose_config` composes the packaged configs plus the user's config directories (what
`finetune --config-dir DIR` / `hydra.searchpath` see). `rebuild_run_config` rebuilds a finished
run's config from what its `.hydra/` recorded: the primary config's name, the config sources the
user added (`--config-dir`, `hydra.searchpath`) and the run's overrides, with more overrides
appended. `check_saved_config` refuses a `.hydra/config.yaml` that no longer matches the digest the
run recorded, and `check_recorded_config` a run directory whose rebuilt config is not the one its
weights were trained with (a run directory's config names callables: it is trusted like a script, so
it must be the one the run recorded); `--allow-edited-config` turns both into warnings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from finetune import config as _config  # noqa: F401  (registers the schema and the resolvers)
from finetune.errors import ConfigError, RunDirError
from finetune.paths import config_dir

log = logging.getLogger(__name__)

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


def check_saved_config(run_dir: Path, recorded_sha256: str | None, recorded_yaml: str | None,
                       allow_edited: bool = False) -> list[str]:
    """Refuse `.hydra/config.yaml` unless it is the file the run started with: its sha256 is the one
    the run recorded in its weights (`config_sha256`; runs without one: its content resolves to the
    config they trained with). Reads nothing but that file and the recorded values: call it before
    anything is composed or built from the run directory. `allow_edited`: warn instead; returns the
    warnings."""
    import hashlib

    run_dir = Path(run_dir)
    saved_file = run_dir / ".hydra" / "config.yaml"
    try:
        data = saved_file.read_bytes()
    except OSError as exc:
        raise RunDirError(f"{saved_file} cannot be read: {exc.strerror or exc}.",
                          "restore the file the run wrote, or evaluate another run") from exc
    if recorded_sha256:
        if hashlib.sha256(data).hexdigest() == recorded_sha256:
            return []
        changed = _saved_config_differences(saved_file, recorded_yaml) if recorded_yaml else []
    else:  # a run from before the digest was recorded: compare what the file resolves to
        if not recorded_yaml:
            raise RunDirError(f"{run_dir / 'model.safetensors'} records no config: the run's config cannot be verified.",
                              "evaluate a run that finetune trained (its weights carry the config they were trained with)")
        changed = _saved_config_differences(saved_file, recorded_yaml, strict=True)
        if not changed:
            return []
    where = f"; it differs at {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}" if changed else ""
    problem = (f"{saved_file} does not match the config the run trained with ({'its sha256, ' if recorded_sha256 else ''}"
               f"recorded in model.safetensors): it was edited since the run{where}.")
    if allow_edited:
        log.warning("%s Going on: --allow-edited-config.", problem)
        return [problem]
    raise RunDirError(problem, "restore the run's .hydra/ as the run wrote it (a config names callables: _target_), "
                               "or pass --allow-edited-config if you made the edit and trust it")


def _saved_config_differences(saved_file: Path, recorded_yaml: str, strict: bool = False) -> list[str]:
    """The keys where `.hydra/config.yaml`, resolved, differs from the recorded config. `strict`: a
    file that cannot be resolved is refused (else: no keys to name)."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True, enum_to_str=True)
    except Exception as exc:  # an edited file can fail in any way while being resolved
        if not strict:
            return []
        raise RunDirError(f"{saved_file} cannot be read back: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          "restore the file the run wrote, or evaluate another run") from exc
    return differing_keys(yaml.safe_load(recorded_yaml), _plain(saved))


def check_recorded_config(run_dir: Path, rebuilt: DictConfig, recorded_yaml: str | None,
                          recorded_sha256: str | None = None, allow_edited: bool = False) -> list[str]:
    """Both checks of a run directory's config: check_saved_config, then check_rebuilt_config."""
    warnings = check_saved_config(run_dir, recorded_sha256, recorded_yaml, allow_edited)
    return [*warnings, *check_rebuilt_config(run_dir, rebuilt, recorded_yaml, allow_edited)]


def check_rebuilt_config(run_dir: Path, rebuilt: DictConfig, recorded_yaml: str | None,
                         allow_edited: bool = False) -> list[str]:
    """Refuse unless the config rebuilt from `.hydra/` (overrides, config dirs) is the one the run
    trained with (`recorded_yaml`: the resolved config stored in its model.safetensors).
    `allow_edited`: warn instead; returns the warnings. Composing does not build anything, so this
    runs before anything is instantiated."""
    run_dir = Path(run_dir)
    if not recorded_yaml:
        raise RunDirError(f"{run_dir / 'model.safetensors'} records no config: the run's config cannot be verified.",
                          "evaluate a run that finetune trained (its weights carry the config they were trained with)")
    changed = differing_keys(yaml.safe_load(recorded_yaml), yaml.safe_load(OmegaConf.to_yaml(rebuilt, resolve=True)))
    if not changed:
        return []
    problem = (f"rebuilding the config of {run_dir} from .hydra/overrides.yaml and its config dirs gives a config other than "
               f"the one the run trained with: it differs at {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. "
               "The overrides were edited, or a config file the run used has changed since.")
    if allow_edited:
        log.warning("%s Going on: --allow-edited-config.", problem)
        return [problem]
    raise RunDirError(problem, "restore the configs the run used (or pass the directory holding them with --config-dir), "
                               "start a new run, or pass --allow-edited-config to use them as they are now")


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
