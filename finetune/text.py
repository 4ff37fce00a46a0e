"""Text data (`data=text`): local jsonl / csv / parquet / txt files, read through Hugging Face
`datasets`, tokenized once by a local tokenizer, batched by `PadCollate`.

Two shapes of sample, both dicts of 1-D LongTensors that `PadCollate` pads into a batch
`{input_ids, attention_mask, labels}`:
- causal LM (`label: null`): `labels` are the tokens themselves (the task shifts them); with
  `pack: true` the texts are concatenated (EOS between them) and cut into blocks of `max_length`
  tokens, with `pack: false` each text is one sequence (truncated to `max_length`) and the
  padding gets label -100;
- classification (`label: <column>`): `labels` is the class index of the text.

Nothing here downloads: data files must exist locally, tokenizers load with
`local_files_only=True`. `datasets`, `tokenizers` and `transformers` are imported only when a
config asks for text data. The Arrow cache that `datasets` keeps lives under `$FINETUNE_CACHE`
(default `~/.cache/finetune`), never beside the user's data.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")
EOS_TOKENS = ("[EOS]", "</s>", "<|endoftext|>", "<eos>", "<|eos|>", "<EOS>")
IGNORE_INDEX = -100  # the label of padding: ignored by the causal-LM loss and metrics


# ---- files -----------------------------------------------------------------------------------
def resolve_files(files: str | Sequence[str] | None, split: str) -> list[str]:
    """`files` (a path, a glob, or a list of them) as existing local files, in a stable order."""
    if files is None or (not isinstance(files, str) and not len(files)):
        raise ConfigError(f"data.{split}.files is not set.", f"give local data files, e.g. data.{split}.files=data/{split}.jsonl")
    found: list[str] = []
    for pattern in [files] if isinstance(files, str) else list(files):
        path = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path] * os.path.exists(path)
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            where = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise ConfigError(
                f"data.{split}.files: {pattern} {where} (looked in {os.path.abspath(path)}).",
                "give local files (.jsonl/.json, .csv, .parquet, .txt; a glob such as 'data/*.jsonl' works), relative "
                "to the directory you launched from; hub datasets are not downloaded: save one locally first "
                "(datasets' Dataset.to_json / to_parquet)",
            )
        found.extend(m for m in matches if m not in found)
    return found


def file_format(files: list[str], format: str, split: str) -> str:
    """The `datasets` builder for the files: `format`, or (auto) the one their extensions name."""
    if format != "auto":
        if format not in set(FORMATS.values()):
            raise ConfigError(f"data.{split}.format={format!r} is not a format finetune reads.",
                              "use auto, json, csv, parquet or text")
        return format
    found = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in found:
        unknown = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise ConfigError(f"data.{split}.files: cannot tell the format of {unknown} from its extension.",
                          f"set data.{split}.format to json, csv, parquet or text")
    if len(found) > 1:
        raise ConfigError(f"data.{split}.files mixes formats ({', '.join(sorted(found))}).",
                          f"give files of one format per split, or set data.{split}.format")
    return found.pop()


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune").expanduser()


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def local_only():
    """Hugging Face libraries in offline mode while data and tokenizers load: nothing reaches the
    network, whatever the user's environment says. The environment is restored after."""
    saved = {name: os.environ.get(name) for name in OFFLINE_ENV}
    os.environ.update({name: "1" for name in OFFLINE_ENV})
    patched = []  # module-level flags read at import time, when those modules are already imported
    for module_name, attributes in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                                    ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        module = sys.modules.get(module_name)
        for attribute in attributes if module is not None else ():
            if hasattr(module, attribute):
                patched.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, True)
    try:
        yield
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars or error logs while reading (the run prints its own lines, and
    a file it cannot read becomes one ConfigError); restored after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def no_texts(files: list[str], split: str) -> ConfigError:
    return ConfigError(f"data.{split}.files ({', '.join(files)}) hold no texts.",
                       f"point data.{split}.files at files with texts (one row or line per text)")


def is_empty(path: str, fmt: str) -> bool:
    """No bytes, or (parquet) no rows."""
    if os.path.getsize(path) == 0:
        return True
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not parquet after all: the reader says so
            return False
    return False


def read_table(files: list[str], fmt: str, split: str, cache_dir: str | None = None):
    """The files as one Hugging Face `datasets.Dataset`: held in memory, read offline, the Arrow
    files `datasets` writes while reading kept under `cache_dir` (default: the cache root)."""
    nonempty = [f for f in files if not is_empty(f, fmt)]  # the builders fail on empty files
    if not nonempty:
        raise no_texts(files, split)
    if len(nonempty) < len(files):
        log.warning("data.%s: %d empty file(s) left out: %s", split, len(files) - len(nonempty),
                    ", ".join(f for f in files if f not in nonempty))
    options: dict[str, Any] = {}
    if fmt == "csv" and all(f.lower().endswith(".tsv") for f in files):
        options["delimiter"] = "\t"
    cache_dir = cache_dir or str(cache_root() / "hf-datasets")
    try:
        with local_only():
            from datasets import load_dataset

            with quiet_datasets():
                return load_dataset(fmt, data_files=nonempty, split="train", cache_dir=cache_dir, keep_in_memory=True, **options)
    except Exception as exc:  # the builders raise many kinds (ArrowInvalid, DatasetGenerationError, ...)
        cause = exc.__cause__ or exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in detail:  # e.g. a csv file with a header line only
            raise no_texts(files, split) from exc
        raise ConfigError(f"data.{split}.files: could not read {', '.join(files)} as {fmt}: {detail}",
                          f"check the files are valid {fmt}, or set data.{split}.format") from exc


def check_column(table, column: str, key: str, split: str) -> None:
    if column not in table.column_names:
        raise ConfigError(
            f"data.{split}.{key}={column!r}: the files have no such column; they have {', '.join(table.column_names)}.",
            f"set data.{split}.{key} to one of those columns" + (" (.txt files have one column, text)" if key == "text" else ""),
        )


# ---- the tokenizer ---------------------------------------------------------------------------
@dataclass
class TextTokenizer:
    """A local tokenizer behind one small interface, whichever library loaded it."""

    path: str
    encode: Callable[[list[str], int | None], list[list[int]]]  # texts, truncate-to -> token ids
    pad_id: int | None  # None: the tokenizer has no pad token
    eos_id: int | None
    vocab_size: int


def load_tokenizer(path: str | os.PathLike | None) -> TextTokenizer:
    """`data.tokenizer`: a `tokenizer.json` file (the `tokenizers` library) or a directory saved by
    `save_pretrained` (transformers' AutoTokenizer, local files only)."""
    if path is None:
        raise ConfigError("data.tokenizer is not set.", "give a tokenizer directory (save_pretrained) or a tokenizer.json file")
    resolved = Path(os.path.expanduser(str(path)))
    if resolved.is_dir():
        return _transformers_tokenizer(resolved)
    if resolved.is_file():
        return _tokenizers_tokenizer(resolved)
    raise ConfigError(
        f"data.tokenizer: {path} does not exist (looked in {resolved.absolute()}).",
        "give a local tokenizer directory (tokenizer.save_pretrained(dir)) or a tokenizer.json file; "
        "hub names are not downloaded",
    )


def _tokenizers_tokenizer(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ConfigError(f"data.tokenizer: {path} is not a tokenizer.json file the tokenizers library reads: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          "give a tokenizer.json (Tokenizer.save) or a tokenizer directory (save_pretrained)") from exc
    tokenizer.no_truncation()  # truncation is ours: max_length, and never while packing
    tokenizer.no_padding()
    ids = {name: tokenizer.token_to_id(name) for name in PAD_TOKENS + EOS_TOKENS}
    eos = next((ids[n] for n in EOS_TOKENS if ids[n] is not None), None)
    pad = next((ids[n] for n in PAD_TOKENS if ids[n] is not None), None)

    def encode(texts: list[str], max_length: int | None) -> list[list[int]]:
        if max_length is None:
            return [e.ids for e in tokenizer.encode_batch(texts)]
        tokenizer.enable_truncation(max_length)  # as transformers truncates: special tokens kept
        try:
            return [e.ids for e in tokenizer.encode_batch(texts)]
        finally:
            tokenizer.no_truncation()

    return TextTokenizer(str(path), encode, pad, eos, tokenizer.get_vocab_size())


def _transformers_tokenizer(path: Path) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        with local_only():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise ConfigError(f"data.tokenizer: could not load a tokenizer from the directory {path} (it holds {held}): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          "give a directory written by tokenizer.save_pretrained(dir), or a tokenizer.json file") from exc
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(texts: list[str], max_length: int | None) -> list[list[int]]:
        if max_length is None:  # packing: whole texts, however long (no "longer than the model" warning)
            return tokenizer(texts, verbose=False)["input_ids"]
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    return TextTokenizer(str(path), encode, pad, eos, len(tokenizer))


@functools.lru_cache(maxsize=8)
def pad_id_of(path: str) -> int:
    """The pad id of the tokenizer at `path`; a ConfigError when it has none."""
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_id is None:
        eos = f" (its EOS id, {tokenizer.eos_id}, works: padding is masked out and labelled -100)" if tokenizer.eos_id is not None else ""
        raise ConfigError(
            f"data.tokenizer: {path} has no pad token, and batches of texts of different lengths need one.",
            f"set data.collate.pad_id to the id to pad with{eos}, or give the tokenizer a pad token "
            "(tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and save_pretrained; the model's vocabulary must hold it)",
        )
    return tokenizer.pad_id


# ---- tokenized samples -----------------------------------------------------------------------
class TokenizedText(Dataset):
    """Samples `{input_ids, labels}` held in memory as tensors (fast to index in the loader)."""

    def __init__(self, input_ids: list[torch.Tensor], labels: list[torch.Tensor] | torch.Tensor | None,
                 classes: list | None = None, tokenizer: str | None = None):
        self.input_ids = input_ids
        self.labels = labels  # None: causal LM (the tokens themselves); else one class index per sample
        self.classes = classes
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "labels": ids if self.labels is None else self.labels[index]}


def tokenize(table, column: str, tokenizer: TextTokenizer, max_length: int | None) -> list[list[int]]:
    """Token ids of every row's text, computed once (`datasets.map`, batched, in memory)."""

    def encode(batch: dict) -> dict:
        return {"input_ids": tokenizer.encode([str(t) for t in batch[column]], max_length)}

    with quiet_datasets():
        encoded = table.select_columns([column]).map(
            encode, batched=True, batch_size=1000, keep_in_memory=True, remove_columns=[column],
            # An explicit fingerprint: `datasets` would otherwise hash the tokenizer to name a cache entry.
            new_fingerprint=hashlib.sha1(f"{tokenizer.path} {max_length} {table._fingerprint}".encode()).hexdigest(),
        )
    return list(encoded["input_ids"])


def pack(sequences: list[list[int]], block: int, eos_id: int | None) -> list[torch.Tensor]:
    """Concatenate the sequences (EOS after each one that lacks it) and cut blocks of `block`
    tokens; the remainder (2 tokens or more) is a last, shorter block, so no text is dropped."""
    stream: list[int] = []
    for ids in sequences:
        stream.extend(ids)
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            stream.append(eos_id)
    tokens = torch.tensor(stream, dtype=torch.long)
    full = len(tokens) // block
    blocks = list(tokens[: full * block].view(full, block)) if full else []
    if len(tokens) - full * block >= 2:
        blocks.append(tokens[full * block:])
    return blocks


def class_indices(values: list, classes: list | None, split: str, label: str) -> tuple[torch.Tensor, list | None]:
    """Labels as class indices: integers as they are; strings by their position in `classes`."""
    if any(v is None for v in values):
        row = next(i for i, v in enumerate(values) if v is None)
        raise ConfigError(f"data.{split}: row {row} has no value in the label column {label!r}.",
                          "give every row a label, or drop the unlabelled rows")
    if classes is None and all(isinstance(v, (int, bool)) or (isinstance(v, float) and v.is_integer()) for v in values):
        indices = torch.tensor([int(v) for v in values], dtype=torch.long)
        if indices.numel() and int(indices.min()) < 0:
            raise ConfigError(f"data.{split}: label column {label!r} holds negative integers.",
                              "integer labels are class indices 0..C-1; or give data.<split>.classes")
        return indices, None
    if classes is None:
        raise ConfigError(f"data.{split}: label column {label!r} mixes kinds of values.",
                          "labels are class indices (integers) or names (strings)")
    position = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(position))
    if unknown:
        raise ConfigError(f"data.{split}: labels {', '.join(unknown[:5])} are not among the classes ({', '.join(map(str, classes))}).",
                          "give data.train.classes / data.val.classes that list every class, or fix the labels")
    return torch.tensor([position[str(v)] for v in values], dtype=torch.long), list(classes)


def class_names(values: list) -> list[str] | None:
    """Sorted label strings, when the labels are strings (None for integer labels)."""
    if values and all(isinstance(v, str) for v in values):
        return sorted(set(values))
    return None


def text_dataset(
    files: str | Sequence[str],
    tokenizer: str,
    text: str = "text",
    label: str | None = None,
    pack: bool = False,
    max_length: int | None = 128,
    format: str = "auto",
    classes: Sequence[str] | None = None,
    classes_from: str | Sequence[str] | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> TokenizedText:
    """A torch Dataset of tokenized texts from local files (the `_target_` of `data=text`).

    `classes`: class names in index order for string labels; null: the sorted label strings of
    `classes_from` (the training files; default: these files). `split` names the config node in
    messages (`data.train`, `data.val`)."""
    if label is not None and pack:
        raise ConfigError(f"data.{split}.pack=true packs texts for a causal LM, but data.{split}.label={label!r} asks for classification.",
                          f"set data.{split}.pack=false (or data=text_classification), or data.{split}.label=null for a causal LM")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"data.max_length={max_length}: a sequence needs at least 2 tokens.", "set data.max_length to 2 or more")
    if pack and max_length is None:
        raise ConfigError(f"data.{split}.pack=true needs data.max_length (the block size).", "set data.max_length, e.g. 128")
    paths = resolve_files(files, split)
    fmt = file_format(paths, format, split)
    tok = load_tokenizer(tokenizer)
    table = read_table(paths, fmt, split, cache_dir)
    check_column(table, text, "text", split)
    if label is not None:
        check_column(table, label, "label", split)
    texts = list(table[text])
    if None in texts:
        raise ConfigError(f"data.{split}: row {texts.index(None)} of {', '.join(paths)} has no value in the text column {text!r}.",
                          "give every row a text, or drop the empty rows")
    if fmt == "text" and not all(t.strip() for t in texts):  # a .txt file's empty lines are not texts
        table = table.select([i for i, t in enumerate(texts) if t.strip()], keep_in_memory=True)
    if table.num_rows == 0:
        raise no_texts(paths, split)

    sequences = tokenize(table, text, tok, None if pack else max_length)
    if pack:
        samples = pack_sequences(sequences, max_length, tok.eos_id, split, paths)
        log.info("data.%s: %d texts from %s -> %d blocks of %d tokens", split, table.num_rows, describe_files(paths), len(samples), max_length)
        return TokenizedText(samples, None, tokenizer=tok.path)

    keep = [i for i, ids in enumerate(sequences) if ids]
    if len(keep) < len(sequences):
        log.warning("data.%s: %d of %d texts have no tokens and are left out", split, len(sequences) - len(keep), len(sequences))
    if not keep:
        raise ConfigError(f"data.{split}: no text of {', '.join(paths)} has a token.", "check the text column and the tokenizer")
    samples = [torch.tensor(sequences[i], dtype=torch.long) for i in keep]
    if label is None:
        log.info("data.%s: %d texts from %s, one sequence each (up to %s tokens, padded)", split, len(samples), describe_files(paths), max_length)
        return TokenizedText(samples, None, tokenizer=tok.path)

    values = list(table[label])
    if classes is None:
        classes = class_names(values if classes_from is None else reference_labels(classes_from, format, label, split, cache_dir))
    labels, classes = class_indices(values, classes, split, label)
    log.info("data.%s: %d texts from %s, %s", split, len(samples), describe_files(paths),
             f"{len(classes)} classes" if classes else "integer labels")
    return TokenizedText(samples, labels[keep], classes=classes, tokenizer=tok.path)


def reference_labels(files, format: str, label: str, split: str, cache_dir: str | None) -> list:
    """The labels of `classes_from` (the training files), whose sorted names index the classes."""
    paths = resolve_files(files, split)
    table = read_table(paths, file_format(paths, format, split), split, cache_dir)
    check_column(table, label, "label", split)
    return list(table[label])


def pack_sequences(sequences: list[list[int]], block: int, eos_id: int | None, split: str, paths: list[str]) -> list[torch.Tensor]:
    blocks = pack(sequences, block, eos_id)
    if not blocks:
        raise ConfigError(f"data.{split}: the texts of {', '.join(paths)} hold fewer than 2 tokens in all.",
                          "give more text, or check the text column and the tokenizer")
    return blocks


def describe_files(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} files"


# ---- batches ---------------------------------------------------------------------------------
class PadCollate:
    """Samples `{input_ids, labels, ...}` -> a batch padded to the longest sample:
    `input_ids` with the tokenizer's pad id, `attention_mask` 1 on real tokens and 0 on padding,
    token `labels` (causal LM) with -100 on padding; scalar `labels` (classification) stacked.
    Other 1-D tensor keys are padded with 0, scalars stacked.

    `pad_id`: the pad token id; null: the tokenizer's (`tokenizer`: data.tokenizer), else 0.
    Padding is on the right, so a causal model's real tokens never attend to it."""

    def __init__(self, tokenizer: str | None = None, pad_id: int | None = None, label_pad: int = IGNORE_INDEX):
        if pad_id is None:
            pad_id = pad_id_of(str(tokenizer)) if tokenizer is not None else 0
        self.pad_id, self.label_pad = int(pad_id), label_pad

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples or not all(isinstance(s, dict) and "input_ids" in s for s in samples):
            raise TypeError("PadCollate takes samples that are dicts with `input_ids` (finetune.text datasets)")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        lengths = torch.tensor([len(i) for i in ids])
        batch = {"input_ids": pad_right(ids, self.pad_id),
                 "attention_mask": (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()}
        for key in samples[0]:
            if key in batch or key == "attention_mask":
                continue
            values = [torch.as_tensor(s[key]) for s in samples]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
            else:
                batch[key] = pad_right(values, self.label_pad if key == "labels" else 0)
        return batch


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    if all(len(t) == len(tensors[0]) for t in tensors):
        return torch.stack(tensors)  # packed blocks: nothing to pad
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)
