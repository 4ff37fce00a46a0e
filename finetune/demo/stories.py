"""Generated text for the text demo: deterministic, no download.

One small world (each animal has its food, its home and its sound) told two ways:
- task A (pretraining, plenty of text): statements about the animals of the farm;
- task B (fine-tuning, a few hundred texts): questions and answers about the same world, a form
  model A never saw. Spelling, words and the facts themselves carry over from A to B.

Task B is written once as jsonl files (`{"text": ...}` per line) under $FINETUNE_CACHE (default
~/.cache/finetune) and read through `data=text` like any user's files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# animal: (food, home, sound)
WORLD = {
    "cat": ("fish", "house", "meows"),
    "dog": ("bones", "yard", "barks"),
    "cow": ("grass", "field", "moos"),
    "hen": ("seeds", "coop", "clucks"),
    "pig": ("apples", "mud", "oinks"),
    "owl": ("mice", "tree", "hoots"),
    "duck": ("bread", "pond", "quacks"),
    "frog": ("flies", "lake", "croaks"),
    "goat": ("hay", "hill", "bleats"),
    "horse": ("oats", "stable", "neighs"),
    "bee": ("nectar", "hive", "buzzes"),
    "bear": ("honey", "cave", "growls"),
}
NAMES = ["anna", "ben", "cleo", "dan", "eva", "finn", "gus", "hana", "ivan", "jade", "kai", "lena", "milo", "nora",
         "omar", "pia", "rosa", "sam", "tina", "uri"]
COLORS = ["red", "blue", "green", "brown", "black", "white", "grey", "golden"]
SIZES = ["small", "big", "old", "young", "happy", "sleepy"]

# The demo tokenizer's alphabet: one token per character, plus the special tokens (ids 0, 1, 2).
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,:;?!'-\n"
TASK_B_SIZES = {"train": 240, "val": 240}  # texts per split
TASK_B_SEEDS = {"train": 1_000, "val": 2_000_000}


def task_a_text(rng: random.Random) -> str:
    """One statement about the farm (task A)."""
    animal = rng.choice(list(WORLD))
    food, home, sound = WORLD[animal]
    name, color, size = rng.choice(NAMES), rng.choice(COLORS), rng.choice(SIZES)
    form = rng.randrange(4)
    if form == 0:
        return f"{name} has a {color} {animal}. the {animal} lives in the {home} and eats {food}."
    if form == 1:
        return f"the {size} {animal} {sound} in the {home}."
    if form == 2:
        return f"every {animal} likes {food}. {name} gives {food} to the {color} {animal}."
    return f"in the {home} lives a {size} {animal}. it {sound} and eats {food}."


def task_b_text(rng: random.Random) -> str:
    """One question and its answer about the same farm (task B)."""
    animal = rng.choice(list(WORLD))
    food, home, sound = WORLD[animal]
    name, color = rng.choice(NAMES), rng.choice(COLORS)
    form = rng.randrange(3)
    if form == 0:
        return f"q: where does the {color} {animal} of {name} live? a: in the {home}."
    if form == 1:
        return f"q: what does {name}'s {animal} eat? a: {food}."
    return f"q: which animal {sound}? a: the {animal}."


def task_a_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [task_a_text(rng) for _ in range(n)]


def task_b_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [task_b_text(rng) for _ in range(n)]


def char_tokenizer():
    """The demo's tokenizer (`tokenizers` library): one token per character of ALPHABET, lower-cased
    input, [UNK] for anything else, [PAD] and [EOS] for padding and text ends."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(ALPHABET))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def data_root(root: str | os.PathLike | None = None) -> Path:
    base = Path(root or os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune").expanduser()
    return base / "demo-text-v1"


def ensure_task_b(root: str | os.PathLike | None = None) -> Path:
    """Write task B as train.jsonl and val.jsonl once; later calls reuse them.

    Written to a temporary sibling and renamed into place, so concurrent runs (a parallel sweep)
    never see half-written files."""
    target = data_root(root)
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-text-", dir=target.parent))
    try:
        for split, size in TASK_B_SIZES.items():
            with open(staging / f"{split}.jsonl", "w") as out:
                for text in task_b_texts(size, TASK_B_SEEDS[split]):
                    out.write(json.dumps({"text": text}) + "\n")
        (staging / "COMPLETE").write_text("task B of the finetune text demo\n")
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


def task_b_files(split: str, root: str | None = None) -> str:
    """The jsonl file of task B's `split` (generated on first use): a `data.<split>.files` value."""
    if split not in TASK_B_SIZES:
        raise ValueError(f"split must be one of {', '.join(TASK_B_SIZES)}, not {split!r}")
    return str(ensure_task_b(root) / f"{split}.jsonl")
