"""The commands, one module each: `finetune`, `finetune-inspect`, `finetune-eval`, `finetune-summary`.

They sit on top of the package: each parses its arguments, calls the stages, and turns errors into
one message and an exit code. Nothing imports a command.
"""

from __future__ import annotations

from pathlib import Path

from finetune.console.messages import report_error  # noqa: F401  (the commands' one way to print a user error)


def config_origin(group: str | None) -> str | None:
    """Where the composed values of config group `group` came from, inside a Hydra run: its option
    and file (`checkpoint=demo (…/conf/checkpoint/demo.yaml)`) and the command line's overrides of it.
    A default the user never chose shows up here, e.g. a group's file that leaks a declaration."""
    from hydra.core.hydra_config import HydraConfig

    if not group or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    choice = hydra_cfg.runtime.choices.get(group)
    parts = []
    if choice:
        files = [Path(src.path) / group / f"{choice}.yaml" for src in hydra_cfg.runtime.config_sources
                 if src.schema == "file" and (Path(src.path) / group / f"{choice}.yaml").is_file()]
        parts.append(f"{group}={choice}" + (f" ({files[-1]})" if files else ""))
    else:
        parts.append(f"the primary config's `{group}` (no {group}= option chosen)")
    keys = {o: o.lstrip("+~").split("=", 1)[0] for o in hydra_cfg.overrides.task}
    overrides = [o for o, key in keys.items() if key.startswith(group + ".")]  # not `group=option`: named above
    if overrides:
        parts.append("the command line's " + " ".join(overrides))
    return " and ".join(parts)
