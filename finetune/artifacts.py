"""Each deployable artifact of a run, written to a staged path and loaded back the way its user
loads it: the model export.py runs beside the trained one to verify the artifact.

- `merged.safetensors`: the adapters folded into the base weights, the adapter tensors gone: the
  state of model B built without its lora ops, loaded into that model with strict=True.
- `adapter/`: the adapters alone in PEFT's format (`adapter_model.safetensors`,
  `adapter_config.json`), plus -- as PEFT's `modules_to_save` -- every other module whose tensors
  are not what the checkpoint gives (a new head, an inserted adapter), loaded with
  `peft.PeftModel.from_pretrained` onto model B without its lora ops, as built from the checkpoint.
- `model.pt2`: a `torch.export` program of the deployable model (merged, for lora runs), every
  input dimension dynamic where the model allows it; loaded with `torch.export.load(...).module()`.
- `model.onnx`: the same program as ONNX (the dynamo exporter), run with onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.adapters import NotPeftExpressible, lora_modules, merged_state_dict, peft_config, peft_state_dict
from finetune.errors import FinetuneError
from finetune.model import AppliedEdit, build_model
from finetune.state import write_atomic

MERGED = "merged.safetensors"
ADAPTER = "adapter"
PROGRAM = "model.pt2"
ONNX = "model.onnx"


class ArtifactError(FinetuneError):
    """An artifact cannot be written for this model (the exporter refused it)."""


# ---- merged weights, PEFT adapter ---------------------------------------------------------------
def stage_merged(model_cfg, model: nn.Module, path: Path, metadata: dict[str, str]) -> nn.Module:
    """`path`: the model's state with every adapter merged; returns model B without lora ops holding it."""
    from safetensors.torch import load_file, save_file

    from finetune.storage import unshared

    merged = unshared({k: v.contiguous().cpu() for k, v in merged_state_dict(model).items()})
    write_atomic(path, lambda tmp: save_file(merged, str(tmp), metadata={**metadata, "lora": "merged"}))
    del merged
    return build_without_lora(model_cfg, load_file(str(path)))


def build_without_lora(model_cfg, state: dict[str, torch.Tensor]) -> nn.Module:
    """Model B without its lora ops, holding `state` (strict). Built on the meta device and assigned
    where the model allows it (no second random init of the whole model), else built normally."""
    try:
        with torch.device("meta"):
            model, _ = build_model(model_cfg, lora=False)
        model.load_state_dict(state, strict=True, assign=True)
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return model
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    model, _ = build_model(model_cfg, lora=False)
    model.load_state_dict(state, strict=True)
    return model


def _base_from_checkpoint(cfg) -> tuple[nn.Module, list[AppliedEdit]]:
    """What a PEFT user starts from: model B without its lora ops, loaded from checkpoint.path (its
    first entry, the base weights, when it is a list)."""
    from omegaconf import OmegaConf

    from finetune.checkpoint.load import checkpoint_paths, load_checkpoint

    ckpt_cfg = OmegaConf.merge(cfg.checkpoint, {"path": checkpoint_paths(cfg.checkpoint.path)[0]})
    model, edits = build_model(cfg.model, lora=False)
    load_checkpoint(model, ckpt_cfg, edits, mmap=True)
    return model, edits


def _modules_to_save(model: nn.Module, base: nn.Module, base_keys: list[str]) -> list[str]:
    """The modules of the trained model whose tensors are not the base's: the adapter must carry
    them (PEFT's modules_to_save). Raises NotPeftExpressible where PEFT cannot say it."""
    trained = model.state_dict()
    base_sd = base.state_dict()
    differs = [k for k in base_keys if k not in base_sd or trained[k].shape != base_sd[k].shape
               or not torch.equal(trained[k], base_sd[k].to(trained[k].device))]
    owners = sorted({k.rpartition(".")[0] for k in differs})
    if "" in owners:
        top = [k for k in differs if "." not in k]
        raise NotPeftExpressible(f"top-level tensors changed in training ({', '.join(top[:4])}); PEFT's modules_to_save "
                                 "takes modules only")
    wrapped = lora_modules(model)
    changed_base = [o for o in owners if o in wrapped]
    if changed_base:
        raise NotPeftExpressible(f"the base weights of {len(changed_base)} LoRA-wrapped module(s) changed in training "
                                 f"({', '.join(changed_base[:4])}: policy.unfreeze or policy.train?); a PEFT adapter applies to "
                                 "the checkpoint's base weights")
    owners = sorted({_widest(o, set(differs), list(trained), wrapped) for o in owners})
    top_owners = [o for o in owners if not any(o.startswith(other + ".") for other in owners)]
    names = [n for n, _ in base.named_modules() if n]
    for owner in top_owners:
        inside = [w for w in wrapped if w.startswith(owner + ".")]
        if inside:
            raise NotPeftExpressible(f"'{owner}' changed in training and holds LoRA-wrapped modules ({inside[0]}); PEFT "
                                     "cannot save a module that it also adapts")
        clash = [n for n in names if n != owner and n.endswith(owner)]
        if clash:
            raise NotPeftExpressible(f"'{owner}' changed in training, and PEFT finds modules_to_save by name suffix: "
                                     f"it would also take '{clash[0]}'")
    return top_owners


def _widest(owner: str, differs: set[str], keys: list[str], wrapped) -> str:
    """The highest module above `owner` all of whose tensors changed and that holds no adapter (an
    inserted `adapter`, not its `adapter.down` and `adapter.up`): the module PEFT saves whole."""
    best = owner
    parts = owner.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:depth])
        inside = [k for k in keys if k.startswith(candidate + ".")]
        if any(k not in differs for k in inside) or any(w.startswith(candidate + ".") for w in wrapped):
            break
        best = candidate
    return best


def write_peft_adapter(model: nn.Module, directory: Path, modules_to_save: list[str] = ()) -> dict:
    """`directory`/adapter_model.safetensors and adapter_config.json: the model's adapters as PEFT
    saves them, plus the whole state of each module in `modules_to_save` (under
    `base_model.model.<module>.<tensor>`, as PEFT saves those). Returns the config written."""
    from safetensors.torch import save_file

    from finetune.storage import unshared

    config = peft_config(model, list(modules_to_save))
    tensors = peft_state_dict(model)
    for key, value in model.state_dict().items():
        if any(key.startswith(owner + ".") for owner in modules_to_save):
            tensors[f"base_model.model.{key}"] = value.detach()
    payload = unshared({k: v.contiguous().cpu() for k, v in tensors.items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "adapter_model.safetensors", lambda tmp: save_file(payload, str(tmp), metadata={"format": "pt"}))
    write_atomic(directory / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return config


def stage_peft_adapter(cfg, model: nn.Module, directory: Path) -> nn.Module | None:
    """Write the PEFT adapter into `directory`; returns the PeftModel that loads it onto the base
    built from the checkpoint (None when peft is not installed). Raises NotPeftExpressible."""
    if not cfg.checkpoint.path:
        raise NotPeftExpressible("checkpoint.path is null: the base weights are this run's own random init, which no "
                                 "base model holds")
    base, _ = _base_from_checkpoint(cfg)
    base.to(next(model.parameters()).device)
    lora_keys = {f"{n}.{p}" for n, m in lora_modules(model).items() for p in m.lora_param_names}
    base_keys = [k for k in model.state_dict() if k not in lora_keys]
    write_peft_adapter(model, directory, _modules_to_save(model, base, base_keys))
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel.from_pretrained(base, str(directory), is_trainable=False)


# ---- programs: torch.export, ONNX ---------------------------------------------------------------
@dataclass
class ExampleInputs:
    """One validation batch's model inputs (as the task passes them): what the exporters trace."""

    args: tuple
    kwargs: dict[str, Any]

    def dynamic_shapes(self):
        """Every dimension of every tensor input dynamic where the model allows it (batch size,
        sequence length, image size): Dim.AUTO lets the exporter keep the ones the model fixes."""
        from torch.export import Dim

        def dims(value):
            if isinstance(value, torch.Tensor):
                return {i: Dim.AUTO for i in range(value.dim())}
            if isinstance(value, (list, tuple)):
                return type(value)(dims(v) for v in value)
            if isinstance(value, dict):
                return {k: dims(v) for k, v in value.items()}
            return None

        return {**{f"__arg{i}": dims(v) for i, v in enumerate(self.args)}, **{k: dims(v) for k, v in self.kwargs.items()}}


def _shapes_for(model: nn.Module, example: ExampleInputs):
    """dynamic_shapes keyed by the forward's parameter names, as torch.export wants them."""
    import inspect

    shapes = example.dynamic_shapes()
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyed = {}
    for key, value in shapes.items():
        if key.startswith("__arg"):
            index = int(key[5:])
            keyed[names[index] if index < len(names) else key] = value
        else:
            keyed[key] = value
    return keyed


def _exported_program(model: nn.Module, example: ExampleInputs):
    """The torch.export program of `model` in eval mode. A Hugging Face model is traced without its
    key/value cache output (`config.use_cache`: a cache object is no tensor an exporter can return)."""
    model.eval()
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    try:
        if cached:
            config.use_cache = False
        return torch.export.export(model, example.args, example.kwargs, dynamic_shapes=_shapes_for(model, example))
    except Exception as exc:  # torch.export's errors are many kinds; each names what it could not trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"torch.export cannot trace {type(model).__name__}: {first}",
                            "the model's forward has Python control flow on tensor values or unsupported code; "
                            "see https://pytorch.org/docs/stable/export.html (HYDRA_FULL_ERROR=1 shows the exporter's whole message)") from exc
    finally:
        if cached:
            config.use_cache = cached


def stage_program(model: nn.Module, example: ExampleInputs, path: Path) -> nn.Module:
    """`path`: the torch.export program of `model` (float32, eval mode); returns it loaded back."""
    program = _exported_program(model, example)
    torch.export.save(program, str(path))  # `path` is staged: it is moved into place once verified
    return torch.export.load(str(path)).module()


class OnnxRuntimeModule(nn.Module):
    """An ONNX file run by onnxruntime behind a module's call: tensors in, the model's own output
    structure out (the traced output's pytree, its tensor leaves filled from the session)."""

    def __init__(self, path: Path, example: ExampleInputs, output_spec, output_leaves: list):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_spec = output_spec
        self.output_leaves = output_leaves  # non-tensor leaves are kept as traced

    def forward(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        inputs = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        if len(inputs) != len(self.input_names):
            raise ArtifactError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                                f"the batch gives {len(inputs)}", "export with the same task.inputs the run used")
        device = inputs[0].device if inputs else torch.device("cpu")
        feed = {name: value.detach().cpu().numpy() for name, value in zip(self.input_names, inputs)}
        outputs = iter(self.session.run(None, feed))
        leaves = [torch.from_numpy(next(outputs)).to(device) if isinstance(leaf, torch.Tensor) else leaf
                  for leaf in self.output_leaves]
        return tree_unflatten(leaves, self.output_spec)


def stage_onnx(model: nn.Module, example: ExampleInputs, path: Path) -> nn.Module:
    """`path`: `model` as ONNX (torch.onnx's dynamo exporter, from the torch.export program, weights
    inside the file; beside it as `<name>.data` when over 2 GB); returns an onnxruntime module."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ArtifactError(f"--format onnx needs the onnx, onnxscript and onnxruntime packages ({exc.name} is not installed).",
                            'pip install "finetune[export]"') from exc
    from torch.utils._pytree import tree_flatten

    program = _exported_program(model, example)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"the ONNX exporter cannot convert {type(model).__name__}: {first}",
                            "use --format torch_export (HYDRA_FULL_ERROR=1 shows the exporter's whole message)") from exc
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    onnx_program.save(str(path), external_data=large)  # `path` is staged: it is moved into place once verified
    with torch.no_grad():
        traced = program.module()(*example.args, **example.kwargs)  # the output structure as exported
    leaves, spec = tree_flatten(traced)
    return OnnxRuntimeModule(path, example, spec, leaves)
