"""Task B of the demo as a torchvision ImageFolder over generated PNG files (real decode path)."""

from __future__ import annotations

from finetune.demo.shapes import ensure_task_b


def shapes_task_b(split: str, transform=None, root: str | None = None):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(ensure_task_b(root) / split), transform=transform)
