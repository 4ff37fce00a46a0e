"""Where the packaged configs live: finetune/conf in a wheel, conf/ beside the package in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> str:
    installed = _PACKAGE / "conf"
    return str(installed if installed.is_dir() else _PACKAGE.parent / "conf")
