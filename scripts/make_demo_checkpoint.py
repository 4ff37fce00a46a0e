"""Make the demo's base checkpoint: DemoNet pretrained on task A (8 shapes), reproducibly.

    python scripts/make_demo_checkpoint.py            # writes finetune/demo/assets/demo_shapes_a.safetensors

The weights are saved the way real checkpoints often arrive: from a DDP-wrapped model, so every
key starts with `module.` (the demo config shows the remap rule that handles it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from finetune.demo.net import DemoNet
from finetune.demo.shapes import TASK_A_CLASSES, task_a_arrays

OUT = Path(__file__).resolve().parent.parent / "finetune" / "demo" / "assets" / "demo_shapes_a.safetensors"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25  # the demo's Normalize(mean=0.5, std=0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    x_np, y_np = task_a_arrays(args.per_class, seed=7)
    xv_np, yv_np = task_a_arrays(100, seed=8)
    x, y, xv, yv = to_tensor(x_np), torch.from_numpy(y_np), to_tensor(xv_np), torch.from_numpy(yv_np)
    print(f"task A: {len(x)} train / {len(xv)} val images of {len(TASK_A_CLASSES)} shapes ({time.time() - t0:.1f}s)")

    model = DemoNet(num_classes=len(TASK_A_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = args.epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            batch = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  val acc {acc:.3f}  ({time.time() - t0:.0f}s)")

    # As saved from a DistributedDataParallel-wrapped model: `module.` on every key.
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={
        "description": "finetune demo: DemoNet(num_classes=8, width=16) pretrained on task A (8 shapes)",
        "classes": ",".join(TASK_A_CLASSES),
        "val_acc": f"{acc:.4f}",
        "made_by": "scripts/make_demo_checkpoint.py",
    })
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), task A val acc {acc:.3f}")


if __name__ == "__main__":
    main()
