"""Procedural shape images for the embedded demo: deterministic, no download.

Task A (pretraining, plenty of data): which of 8 shapes is drawn.
Task B (fine-tuning, few labels): a new label set — how many corners the outline has — over
those shapes and four it has never seen. Features that tell shapes apart carry over from A to B.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
_SCALE = 4  # draw large, then downsample: anti-aliased edges

TASK_A_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "hexagon", "star", "ring"]
TASK_B_CLASSES = {
    "curved": ["circle", "ring", "ellipse"],
    "three_corners": ["triangle", "right_triangle"],
    "four_corners": ["square", "diamond", "rectangle"],
    "many_corners": ["hexagon", "star", "plus", "pentagon"],
}
TASK_B_SIZES = {"train": 16, "val": 60}  # images per class


def _polygon(cx: float, cy: float, r: float, sides: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    points = []
    steps = sides * (2 if inner else 1)
    for i in range(steps):
        radius = r if not inner or i % 2 == 0 else r * inner
        angle = rot + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _rotate(points, cx, cy, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def draw_shape(shape: str, seed: int) -> Image.Image:
    """One RGB image of `shape` with random colours, position, size, rotation and noise."""
    rng = random.Random(seed)
    size = IMAGE_SIZE * _SCALE
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    fg = tuple(rng.randint(140, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.24, 0.36) * size
    cx = rng.uniform(r + 2, size - r - 2)
    cy = rng.uniform(r + 2, size - r - 2)
    rot = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ri = r * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif shape == "ellipse":
        ry = r * rng.uniform(0.45, 0.65)
        box = Image.new("L", (size, size), 0)
        ImageDraw.Draw(box).ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=255)
        img.paste(Image.new("RGB", (size, size), fg), mask=box.rotate(math.degrees(rot), center=(cx, cy)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fg)
    elif shape == "rectangle":
        h = r * rng.uniform(0.35, 0.55)
        pts = [(cx - r, cy - h), (cx + r, cy - h), (cx + r, cy + h), (cx - r, cy + h)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fg)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif shape == "right_triangle":
        pts = [(cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8), (cx - r, cy - r * 0.8)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fg)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, rot), fill=fg)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fg)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fg)
    elif shape == "plus":
        w = r * 0.32
        arms = [(cx - r, cy - w), (cx - w, cy - w), (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w)]
        draw.polygon(_rotate(arms, cx, cy, rot), fill=fg)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    noise = Image.effect_noise((IMAGE_SIZE, IMAGE_SIZE), rng.uniform(8, 24)).convert("RGB")
    return Image.blend(img, noise, 0.12).filter(ImageFilter.SMOOTH) if rng.random() < 0.3 else Image.blend(img, noise, 0.12)


def task_a_arrays(n_per_class: int, seed: int):
    """Task A in memory (for pretraining): uint8 images [N, 32, 32, 3] and labels [N]."""
    import numpy as np

    images, labels = [], []
    for label, shape in enumerate(TASK_A_CLASSES):
        for i in range(n_per_class):
            images.append(np.asarray(draw_shape(shape, seed * 1_000_003 + label * 100_003 + i)))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def _write_split(root: Path, split: str, per_class: int, seed: int) -> None:
    for label, (cls, shapes) in enumerate(TASK_B_CLASSES.items()):
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = shapes[i % len(shapes)]
            draw_shape(shape, seed + label * 10_007 + i).save(folder / f"{cls}_{i:04d}.png")


def ensure_task_b(root: str | os.PathLike | None = None) -> Path:
    """Write task B as PNG files in an ImageFolder layout once; later calls reuse it.

    Written to a temporary sibling and renamed into place, so concurrent runs (a parallel sweep)
    never see a half-written dataset.
    """
    base = Path(root or os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune").expanduser()
    target = base / "demo-shapes-v1"
    if (target / "COMPLETE").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-shapes-", dir=base))
    try:
        _write_split(staging, "train", TASK_B_SIZES["train"], seed=1_000)
        _write_split(staging, "val", TASK_B_SIZES["val"], seed=2_000_000)
        (staging / "COMPLETE").write_text("task B of the finetune demo\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "COMPLETE").exists():  # not a concurrent writer: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
