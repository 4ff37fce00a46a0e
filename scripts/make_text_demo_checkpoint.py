"""Make the text demo's assets: its tokenizer and TinyGPT pretrained on task A, reproducibly.

    python scripts/make_text_demo_checkpoint.py               # from the repository root
    python scripts/make_text_demo_checkpoint.py --out-dir /tmp/a   # elsewhere, to compare
    # writes finetune/demo/assets/text_demo_tokenizer.json and text_demo_a.safetensors (434 KiB)

It takes about 5 minutes on 2 CPU cores (1500 steps) and, with the same torch version, writes
the shipped files bit for bit (task A val perplexity 1.246).

Task A's texts are tokenized with the shipped tokenizer and packed into blocks exactly as
`data=text` does (`finetune.text.pack`), so model A sees what `finetune experiment=text_demo`
feeds model B.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from finetune.demo.gpt import TinyGPT
from finetune.demo.stories import char_tokenizer, task_a_texts
from finetune.text import pack

ASSETS = Path(__file__).resolve().parent.parent / "finetune" / "demo" / "assets"
MODEL = dict(block_size=64, n_layer=2, n_head=4, d_model=64)  # conf/experiment/text_demo.yaml builds the same


def blocks_of(texts: list[str], tokenizer, block: int) -> torch.Tensor:
    eos = tokenizer.token_to_id("[EOS]")
    blocks = pack([e.ids for e in tokenizer.encode_batch(texts)], block, eos)
    return torch.stack([b for b in blocks if len(b) == block])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    tokenizer = char_tokenizer()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out_dir / "text_demo_tokenizer.json"))
    train = blocks_of(task_a_texts(args.texts, seed=7), tokenizer, MODEL["block_size"])
    val = blocks_of(task_a_texts(500, seed=8), tokenizer, MODEL["block_size"])
    print(f"task A: {len(train)} train / {len(val)} val blocks of {MODEL['block_size']} tokens ({time.time() - t0:.1f}s)")

    model = TinyGPT(vocab_size=tokenizer.get_vocab_size(), **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(val)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))
        model.train()
        return loss.item()

    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=g)]
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.3f}  val perplexity {math.exp(val_loss()):.3f}  ({time.time() - t0:.0f}s)")

    perplexity = math.exp(val_loss())
    out = args.out_dir / "text_demo_a.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata={
        "description": f"finetune text demo: TinyGPT(vocab_size={tokenizer.get_vocab_size()}, "
                       + ", ".join(f"{k}={v}" for k, v in MODEL.items()) + ") pretrained on task A (farm statements)",
        "tokenizer": "text_demo_tokenizer.json",
        "val_perplexity": f"{perplexity:.4f}",
        "made_by": "scripts/make_text_demo_checkpoint.py",
    })
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB), task A val perplexity {perplexity:.3f}")


if __name__ == "__main__":
    main()
