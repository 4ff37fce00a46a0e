"""A PEFT LoRA adapter (`adapter_model.safetensors`) read as a checkpoint of model B's own names.

PEFT saves `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (`lora_embedding_A` / `_B`
for embeddings, `lora_magnitude_vector` with DoRA) and the whole state of its `modules_to_save`
under `base_model.model.<key>`. Our lora op keeps the base names and puts the adapter beside them
(`<module>.lora_a`, `.lora_b`, `.lora_magnitude`), so the conversion is a pure rename (and a
reshape of a convolution's magnitude, which PEFT keeps as [1, out, 1, 1]).

The scale of an adapter is `lora_alpha / r` (`/ sqrt(r)` with rsLoRA): it lives in
`adapter_config.json`, not in the tensors, so a mismatch with the op's alpha would load without a
shape error and silently change the model. `check_adapter_config` compares it per module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from finetune.errors import CheckpointError

PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<ab>lora_(?:embedding_)?[AB])(?:\.default)?(?:\.weight)?|"
    r"(?P<mag>lora_magnitude_vector)(?:\.default)?(?:\.weight)?)$")
_OURS = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b",
         "lora_magnitude_vector": "lora_magnitude"}
CONFIG = "adapter_config.json"
_CONFIG_MAX_BYTES = 1 << 20  # an adapter_config.json is a few KB: anything larger is not one


def is_peft_adapter(keys) -> bool:
    """Every key under PEFT's `base_model.model.` and at least one LoRA tensor among them."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(PREFIX) for k in keys) and any(_LORA_KEY.match(k[len(PREFIX):]) for k in keys)


def from_peft(state: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the adapter's tensors under model B's names, {PEFT key: our key}). A modules_to_save entry
    (`<module>.modules_to_save.default.<tensor>` in memory, `<module>.<tensor>` saved) keeps its
    name; `original_module` copies PEFT keeps in memory are dropped."""
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, tensor in state.items():
        rest = key[len(PREFIX):]
        if ".original_module." in rest:
            continue
        match = _LORA_KEY.match(rest)
        if match:
            name = f"{match['module']}.{_OURS[match['ab'] or match['mag']]}"
        else:
            name = rest.replace(".modules_to_save.default.", ".")
        target = model_sd.get(name)
        if target is not None and tensor.shape != target.shape and tensor.numel() == target.numel() \
                and [d for d in tensor.shape if d != 1] == [d for d in target.shape if d != 1]:
            tensor = tensor.reshape(target.shape)  # a convolution's DoRA magnitude: [1, out, 1, 1] -> [out]
        out[name] = tensor
        renamed[key] = name
    return out, renamed


def read_adapter_config(adapter_file: Path) -> dict | None:
    """adapter_config.json beside the adapter file (None: there is none). Read as data only."""
    path = Path(adapter_file).parent / CONFIG
    if not path.is_file():
        return None
    if path.stat().st_size > _CONFIG_MAX_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes: not a PEFT adapter config.",
                              "point checkpoint.path at PEFT's adapter_model.safetensors with its own adapter_config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}", "save the adapter again with peft's save_pretrained") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.", "save the adapter again with peft's save_pretrained")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose name is it or ends with `.key`
    (or matches it as a regex)."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _number(config: dict, key: str, default):
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"adapter_config.json: {key}={value!r} is not a positive number.",
                              "save the adapter again with peft's save_pretrained")
    return value


def check_adapter_config(config: dict, modules: dict, loaded_modules: set[str], rules: dict[str, str]) -> None:
    """For each LoRA-wrapped module the adapter fills (`loaded_modules`), the adapter's scale and DoRA
    flag must be the op's: `rules` names the op of each module (for the message)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"the adapter is a PEFT {config.get('peft_type')} adapter; only LoRA (and DoRA) adapters load "
                              "onto lora ops.", "use a LoRA adapter, or train this one's kind with PEFT itself")
    r, alpha = _number(config, "r", 8), _number(config, "lora_alpha", 8)
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    wrong = []
    for name in sorted(loaded_modules):
        module = modules[name]
        rank = _pattern_value(config.get("rank_pattern"), name, r)
        scale = _pattern_value(config.get("alpha_pattern"), name, alpha) / (math.sqrt(rank) if rslora else rank)
        if not math.isclose(scale, module.lora_scale, rel_tol=1e-6):
            wrong.append(f"{name}: the adapter's scale is {scale:g} (lora_alpha / {'sqrt(r)' if rslora else 'r'}), "
                         f"{rules.get(name, 'the op')} gives alpha {module.lora_alpha:g} / rank {module.lora_rank} = {module.lora_scale:g}")
        elif dora != module.lora_dora:
            wrong.append(f"{name}: the adapter has use_dora={str(dora).lower()}, {rules.get(name, 'the op')} dora: "
                         f"{str(module.lora_dora).lower()}")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise CheckpointError(
            f"the adapter does not compute what the lora ops compute: {shown}.",
            f"set the op's rank and alpha to the adapter's (r {r}, lora_alpha {alpha}"
            f"{', rsLoRA: alpha = lora_alpha * sqrt(r)' if rslora else ''}) and dora to use_dora", group="model")
