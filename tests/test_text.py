"""Text data (`finetune.text`, `data=text`, `data=text_classification`) and the text demo
(`experiment=text_demo`): local files in every format, packing and padding, class labels, both
kinds of local tokenizer, one clear error per bad input, and real runs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from finetune.errors import ConfigError
from finetune.text import IGNORE_INDEX, PadCollate, load_tokenizer, local_only, text_dataset

REPO = Path(finetune.__file__).resolve().parent.parent
TOKENIZER = str(Path(finetune.__file__).resolve().parent / "demo" / "assets" / "text_demo_tokenizer.json")
PAD, EOS = 0, 2  # the demo tokenizer's [PAD] and [EOS]
TEXTS = ["the cat eats fish.", "q: where does the dog live? a: in the yard.", "a hen.",
         "every cow likes grass. anna gives grass to the red cow.", "the owl hoots in the tree."]


# ---- helpers ---------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def write_txt(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(r["text"] for r in rows) + "\n")
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "txt": write_txt}


def ids_of(text: str) -> list[int]:
    return load_tokenizer(TOKENIZER).encode([text], None)[0]


def rows(texts=TEXTS) -> list[dict]:
    return [{"text": t} for t in texts]


# ---- (a) every format gives the same tokens ----------------------------------------------------
@pytest.mark.parametrize("pack", [True, False])
def test_the_same_texts_give_the_same_tokens_in_every_format(tmp_path, pack):
    got = {}
    for name, write in WRITERS.items():
        path = write(tmp_path / f"texts.{name}", rows())
        dataset = text_dataset(str(path), TOKENIZER, pack=pack, max_length=16)
        got[name] = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    assert got["jsonl"], "no samples"
    for name in ("csv", "parquet", "txt"):
        assert got[name] == got["jsonl"], name
    if not pack:  # one sequence per text, in file order, truncated to max_length
        assert got["jsonl"] == [ids_of(t)[:16] for t in TEXTS]


# ---- (b) causal LM: packing and padding --------------------------------------------------------
def test_packing_cuts_blocks_of_max_length_with_eos_between_texts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows())
    dataset = text_dataset(str(path), TOKENIZER, pack=True, max_length=16)
    stream = [token for text in TEXTS for token in [*ids_of(text), EOS]]
    blocks = [dataset[i]["input_ids"] for i in range(len(dataset))]
    assert all(len(b) == 16 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 16
    assert torch.cat(blocks).tolist() == stream  # nothing dropped, EOS after every text
    for i in range(len(dataset)):
        assert torch.equal(dataset[i]["labels"], dataset[i]["input_ids"])
    batch = PadCollate(tokenizer=TOKENIZER)([dataset[i] for i in range(len(dataset) - 1)])
    assert batch["input_ids"].shape == (len(dataset) - 1, 16)
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())


def test_padding_labels_are_minus_100_exactly_on_padding(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows())
    dataset = text_dataset(str(path), TOKENIZER, pack=False, max_length=24)
    batch = PadCollate(tokenizer=TOKENIZER)([dataset[i] for i in range(len(dataset))])
    lengths = [min(len(ids_of(t)), 24) for t in TEXTS]
    assert batch["input_ids"].shape == (len(TEXTS), max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert bool(padding.any())
    assert torch.equal(batch["labels"] == IGNORE_INDEX, padding)
    assert bool((batch["input_ids"][padding] == PAD).all())
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])


# ---- (c) classification ----------------------------------------------------------------------
def test_classification_labels_index_the_training_files_names(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": c} for t, c in
                                                   zip(TEXTS, ["spam", "ham", "eggs", "spam", "ham"])])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a cat.", "label": "spam"}, {"text": "dogs bark.", "label": "eggs"}])
    train_set = text_dataset(str(train), TOKENIZER, label="label", max_length=32)
    val_set = text_dataset(str(val), TOKENIZER, label="label", max_length=32, classes_from=str(train), split="val")
    assert train_set.classes == val_set.classes == ["eggs", "ham", "spam"]
    assert [int(train_set[i]["labels"]) for i in range(5)] == [2, 1, 0, 2, 1]
    assert [int(val_set[i]["labels"]) for i in range(2)] == [2, 0]  # by val alone it would be [1, 0]
    alone = text_dataset(str(val), TOKENIZER, label="label", max_length=32, split="val")
    assert [int(alone[i]["labels"]) for i in range(2)] == [1, 0]

    batch = PadCollate(tokenizer=TOKENIZER)([train_set[i] for i in (0, 2)])  # "the cat eats fish.", "a hen."
    assert batch["input_ids"].shape == (2, len(ids_of(TEXTS[0])))  # the longest of this batch
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(ids_of(TEXTS[0])), len(ids_of(TEXTS[2]))]
    assert batch["labels"].tolist() == [2, 0] and batch["labels"].dtype == torch.long


def test_integer_labels_are_class_indices_as_they_are(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)])
    dataset = text_dataset(str(path), TOKENIZER, label="label", max_length=32)
    assert dataset.classes is None
    assert [int(dataset[i]["labels"]) for i in range(5)] == [0, 1, 2, 0, 1]


# ---- (d) a save_pretrained directory and a tokenizer.json agree ----------------------------------
def test_tokenizer_directory_and_tokenizer_json_give_the_same_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_file=TOKENIZER, pad_token="[PAD]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(str(directory))
    from_dir, from_json = load_tokenizer(directory), load_tokenizer(TOKENIZER)
    assert (from_dir.pad_id, from_dir.eos_id) == (from_json.pad_id, from_json.eos_id) == (PAD, EOS)
    path = write_jsonl(tmp_path / "t.jsonl", rows())
    for pack, max_length in ((True, 16), (False, 12)):
        a = text_dataset(str(path), str(directory), pack=pack, max_length=max_length)
        b = text_dataset(str(path), TOKENIZER, pack=pack, max_length=max_length)
        assert [a[i]["input_ids"].tolist() for i in range(len(a))] == [b[i]["input_ids"].tolist() for i in range(len(b))]


# ---- (e) one clear error per bad input -------------------------------------------------------
def error_of(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.fix, "a ConfigError must say how to fix it"
    return str(info.value)


def test_missing_file_and_bad_glob(tmp_path):
    message = error_of(lambda: text_dataset(str(tmp_path / "nope.jsonl"), TOKENIZER))
    assert "nope.jsonl" in message and "does not exist" in message
    message = error_of(lambda: text_dataset(str(tmp_path / "*.nothing"), TOKENIZER, split="val"))
    assert "*.nothing" in message and "data.val.files" in message
    message = error_of(lambda: text_dataset(str(tmp_path), TOKENIZER))
    assert "is a directory" in message


def test_unknown_format(tmp_path):
    path = tmp_path / "texts.xml"
    path.write_text("<text>a cat</text>\n")
    assert "texts.xml" in error_of(lambda: text_dataset(str(path), TOKENIZER))
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows())
    assert "format='xml'" in error_of(lambda: text_dataset(str(jsonl), TOKENIZER, format="xml"))


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a cat"\n')
    message = error_of(lambda: text_dataset(str(path), TOKENIZER))
    assert "broken.jsonl" in message and "as json" in message


def test_missing_text_and_label_columns_name_the_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": t, "y": 0} for t in TEXTS])
    message = error_of(lambda: text_dataset(str(path), TOKENIZER))
    assert "data.train.text='text'" in message and "body" in message
    message = error_of(lambda: text_dataset(str(path), TOKENIZER, text="body", label="label"))
    assert "data.train.label='label'" in message and "y" in message


def test_val_labels_outside_the_training_classes(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "ham"}, {"text": "b", "label": "spam"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "eggs"}])
    message = error_of(lambda: text_dataset(str(val), TOKENIZER, label="label", classes_from=str(train), split="val"))
    assert "eggs" in message and "ham, spam" in message


def test_missing_tokenizer_names_the_path(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows())
    message = error_of(lambda: text_dataset(str(path), str(tmp_path / "no_tokenizer")))
    assert "no_tokenizer" in message and "does not exist" in message
    (tmp_path / "empty_dir").mkdir()
    assert "empty_dir" in error_of(lambda: text_dataset(str(path), str(tmp_path / "empty_dir")))


def test_a_tokenizer_without_a_pad_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[UNK]", "[EOS]", *"abcdefghijklmnopqrstuvwxyz .?:"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.add_special_tokens(["[UNK]", "[EOS]"])
    path = tmp_path / "no_pad.json"
    tokenizer.save(str(path))
    message = error_of(lambda: PadCollate(tokenizer=str(path)))
    assert "no_pad.json" in message and "no pad token" in message and "data.collate.pad_id" in message
    assert "EOS id, 1" in message
    assert PadCollate(tokenizer=str(path), pad_id=1).pad_id == 1  # the fix it names works


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("header.csv", "text\n"), ("blank.txt", "\n\n"),
                                           ("empty.parquet", None)])
def test_an_empty_dataset_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(path))
    else:
        path.write_text(content)
    message = error_of(lambda: text_dataset(str(path), TOKENIZER))
    assert name in message and "no texts" in message


# ---- cheap import, local only ----------------------------------------------------------------
def test_importing_finetune_text_loads_no_hugging_face_library():
    code = "import sys, finetune.text; print([m for m in ('datasets', 'transformers', 'tokenizers') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reading_is_offline_and_caches_under_finetune_cache(tmp_path, finetune_cache, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with local_only():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ
    text_dataset(str(write_jsonl(tmp_path / "t.jsonl", rows())), TOKENIZER)
    assert any((finetune_cache / "hf-datasets").iterdir())


# ---- (f) the text demo in-process ------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_text_demo_runs_in_process(compose, tmp_path):
    from finetune.run import run

    cfg = compose(["experiment=text_demo", "trainer.max_steps=6", "trainer.progress=false"])
    assert cfg.task.monitor == "val/perplexity"
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    names = {r["name"] for r in read_metrics(run_dir) if r["split"] == "val"}
    assert {"perplexity", "token_acc", "loss"} <= names
    assert math.isclose(summary["final"]["val/perplexity"], math.exp(summary["final"]["val/loss"]), rel_tol=1e-4)
    report = json.loads((run_dir / "load_report.json").read_text())
    from safetensors import safe_open

    with safe_open(cfg.checkpoint.path, "pt") as f:
        base_keys = set(f.keys())
    assert set(report["loaded"]) == base_keys
    assert report["missing"] and all(k.startswith("adapter.") for k in report["missing"])
    assert report["unexpected"] == [] and report["mismatched"] == []


# ---- (g) text classification with a Hugging Face BERT ------------------------------------------
def test_text_classification_with_a_tiny_bert(compose, tmp_path):
    from finetune.run import run

    world = [("cat", "meows"), ("dog", "barks"), ("cow", "moos")]
    examples = [{"text": f"the {size} {animal} {sound}.", "label": animal}
                for size in ("big", "small", "old", "young") for animal, sound in world]
    train = write_jsonl(tmp_path / "train.jsonl", examples)
    val = write_jsonl(tmp_path / "val.jsonl", examples[:6])
    cfg = compose(["model=hf_bert_classifier", "checkpoint=none", "data=text_classification", "task=classification",
                   f"data.tokenizer={TOKENIZER}", f"data.train.files={train}", f"data.val.files={val}",
                   "data.max_length=32", "data.batch_size=4", "trainer.epochs=2", "trainer.progress=false"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best"]["metric"] == "val/acc" and 0.0 <= summary["final"]["val/acc"] <= 1.0
    assert "acc" in {r["name"] for r in read_metrics(run_dir) if r["split"] == "val"}


# ---- (h) the real command: pretrained beats scratch ---------------------------------------------
@pytest.mark.slow
def test_text_demo_pretrained_beats_scratch(tmp_path, finetune_cache):
    env = {**os.environ, "FINETUNE_CACHE": str(finetune_cache), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    perplexity = {}
    for name, extra in (("pretrained", []), ("scratch", ["checkpoint.path=null"])):
        run_dir = tmp_path / name
        result = subprocess.run([sys.executable, "-m", "finetune", "experiment=text_demo", "trainer.epochs=3",
                                 "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        perplexity[name] = summary["final"]["val/perplexity"]
    assert perplexity["pretrained"] < 0.7 * perplexity["scratch"], perplexity
