"""Real architectures from tiny configs, their "model A" checkpoints, and the data they train on
(importable as `real_models`; the test configs name `_target_: real_models....` for the data).

The architectures themselves are named in the model configs under tests/conf/model/ (hf_*, timm_*,
tv_*) with `_target_`s into transformers, timm and torchvision, as a user would write them. Model A
of each case is built here from the same config file with its head or input size changed, so the
checkpoint and model B cannot drift apart. Nothing is downloaded: every weight is a random init.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, TensorDataset

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB = 100  # token ids of the text models' configs (tests/conf/model/hf_*.yaml)
PAD = 0


def model_config(name: str):
    """tests/conf/model/<name>.yaml, unresolved."""
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def build(spec, **changes):
    """Instantiate a `{_target_: ...}` spec of a model config, with some of its arguments changed."""
    from hydra.utils import instantiate

    spec = copy.deepcopy(spec)
    for key, value in changes.items():
        OmegaConf.update(spec, key, value, merge=False)
    return instantiate(spec, _convert_="all")


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain copy of the model's state (tied tensors become separate copies)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---- model A checkpoints -------------------------------------------------------------------------
def bert_encoder_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Model A: the bare `BertModel` of hf_bert_classifier.yaml's config, saved by `save_pretrained`
    (keys without the `bert.` prefix that BertForSequenceClassification uses). Returns its
    model.safetensors."""
    from transformers import BertModel

    torch.manual_seed(seed)
    config = build(model_config("hf_bert_classifier").base.config)
    BertModel(config).save_pretrained(directory)
    return Path(directory) / "model.safetensors"


def gpt2_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Model A: hf_gpt2.yaml's GPT2LMHeadModel saved by `save_pretrained` (it stores the tied
    embedding once, as `transformer.wte.weight`). Returns its model.safetensors."""
    torch.manual_seed(seed)
    model = build(model_config("hf_gpt2").base)
    model.save_pretrained(directory)
    return Path(directory) / "model.safetensors"


def torch_checkpoint(path: Path, model_name: str, seed: int = 0, **changes) -> Path:
    """Model A: the base of tests/conf/model/<model_name>.yaml (with `changes` to its arguments),
    its state_dict saved with torch.save."""
    torch.manual_seed(seed)
    model = build(model_config(model_name).base, **changes)
    torch.save(state_dict_of(model), path)
    return Path(path)


# ---- data ------------------------------------------------------------------------------------------
class MarkedTokens(Dataset):
    """Dict samples {input_ids, attention_mask, labels} for sequence classification: each sequence
    (variable length, right-padded with id 0) holds one marker token (1, 2 or 3); the label is
    which one. Other ids are noise from 4..VOCAB-1."""

    def __init__(self, n: int = 32, seed: int = 0, length: int = 16, classes: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            size = int(torch.randint(6, length + 1, (), generator=g))
            label = int(torch.randint(0, classes, (), generator=g))
            ids = torch.randint(classes + 1, VOCAB, (length,), generator=g)
            ids[int(torch.randint(0, size, (), generator=g))] = label + 1
            mask = torch.arange(length) < size
            self.samples.append({"input_ids": torch.where(mask, ids, PAD), "attention_mask": mask.long(),
                                 "labels": torch.tensor(label)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def image_classes(n: int = 32, seed: int = 0, size: int = 32, classes: int = 3) -> Dataset:
    """(image (3, size, size), class index): the class is the brightest channel of the image."""
    x = images(n, size, seed)
    return TensorDataset(x, x.mean(dim=(2, 3))[:, :classes].argmax(dim=1))


def image_multilabel(n: int = 32, seed: int = 0, size: int = 32, labels: int = 5) -> Dataset:
    """(image, multi-hot float (labels,)): label j is on when a fixed mix of the channel means is
    above its median."""
    x = images(n, size, seed)
    means = x.mean(dim=(2, 3)) - 0.5
    w = torch.randn(3, labels, generator=torch.Generator().manual_seed(123))
    return TensorDataset(x, (means @ w > 0).float())


def image_regression(n: int = 32, seed: int = 0, size: int = 32) -> Dataset:
    """(image, float target ()): channel 0's mean minus channel 1's, scaled."""
    x = images(n, size, seed)
    means = x.mean(dim=(2, 3))
    return TensorDataset(x, 10 * (means[:, 0] - means[:, 1]))


def segmentation(n: int = 8, seed: int = 0, size: int = 64, classes: int = 3, bad_class: int | None = None) -> Dataset:
    """(image (3, H, W), mask (H, W) long): a pixel's class is its brightest of the first `classes`
    channels; a 4-pixel border of 255 (ignored). `bad_class`: every mask also holds that index in
    its top-left interior corner (a label the head does not have)."""
    x = images(n, size, seed)
    masks = x[:, :classes].argmax(dim=1)
    masks[:, :4, :] = 255
    masks[:, :, :4] = 255
    if bad_class is not None:
        masks[:, 4:8, 4:8] = bad_class
    return TensorDataset(x, masks)


def peft_lora(model: torch.nn.Module, r: int = 4, target_modules: tuple[str, ...] = ("query", "value"),
              task_type: str = "SEQ_CLS") -> torch.nn.Module:
    """`model` wrapped by PEFT's LoRA, as a user builds it (`get_peft_model`): PEFT freezes every base
    parameter (requires_grad=False) and leaves the adapters and the task head trainable."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), task_type=task_type))
