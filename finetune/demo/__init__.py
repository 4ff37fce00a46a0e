"""The embedded demo: a small CNN pretrained on shapes (task A), fine-tuned on a new label set (task B)."""

from importlib import resources
from pathlib import Path


def asset(name: str) -> str:
    """Absolute path of a file shipped in finetune/demo/assets (works from a wheel too)."""
    return str(Path(str(resources.files("finetune.demo") / "assets" / name)))
