"""Where the packaged configs live: finetune/conf in a wheel, conf/ beside the package in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> str:
    installed = _PACKAGE / "conf"
    return str(installed if installed.is_dir() else _PACKAGE.parent / "conf")


def reserve_dir(base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first directory this process could create.

    Hydra's default `outputs/DATE/TIME` collides when two runs start in the same second; creating
    the directory here (atomic `mkdir`) reserves it. Registered as the `finetune_unique_dir`
    resolver with `use_cache=True`, so one Hydra process resolves it once (Hydra copies the
    cache into every job of a sweep)."""
    import os

    parent, name = os.path.split(base.rstrip("/"))
    if parent:
        os.makedirs(parent, exist_ok=True)
    candidate, n = base, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{base}_{n}"
