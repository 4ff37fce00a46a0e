"""The gradient audit: a trainable tensor whose gradient is None (not in the graph) fails on step 1;
one whose gradient is present but exactly zero (a zero-initialised path: timm's zero_init_last,
LoRA's B = 0, a zero gate) is re-checked over the first ZERO_GRAD_STEPS optimizer steps and fails
only if it never turns non-zero. Unit tests on small modules, then in-process runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny import LowRank, TinyNetDeadBranch, TinyNetGated, TinyNetUnused
from finetune.audit import ZERO_GRAD_STEPS, GradAudit, audit_gradients, recheck_zero_gradients
from finetune.errors import AuditError

BRANCH = ["gated.branch.0.weight", "gated.branch.0.bias", "gated.branch.2.weight", "gated.branch.2.bias"]


def train(model: nn.Module, steps: int, allow: list[str] = (), audit: GradAudit | None = None) -> GradAudit:
    """What loop.optimizer_step does around the audit: step 1 audits, the next steps re-check."""
    torch.manual_seed(0)
    audit = audit or GradAudit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for step in range(1, steps + 1):
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 1:
            audit_gradients(model, list(allow), audit)
        elif audit.zero_grad_pending:
            recheck_zero_gradients(model, audit, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return audit


def backward_once(model: nn.Module) -> None:
    torch.manual_seed(0)
    nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()


# ---- unit tests ------------------------------------------------------------------------------

def test_a_module_never_used_in_forward_fails_on_step_1():
    audit = GradAudit()
    with pytest.raises(AuditError) as info:
        train(TinyNetUnused(), 1, audit=audit)
    assert info.value.problem == "2 trainable parameter(s) received no gradient on the first step: unused.weight, unused.bias"
    assert "never used in forward()" in info.value.fix and "policy.allow_no_grad" in info.value.fix
    assert audit.grad_flow_ok is False and audit.no_grad == ["unused.weight", "unused.bias"] and audit.zero_grad == []


def test_a_zero_gated_path_passes_and_records_when_it_opened(caplog):
    model = TinyNetGated()
    caplog.set_level(logging.INFO, logger="finetune.audit")
    audit = train(model, 1)
    assert audit.no_grad == [] and audit.zero_grad == BRANCH and audit.zero_grad_pending == BRANCH
    assert audit.grad_flow_ok is None  # pending
    assert "gated.gate" not in audit.zero_grad  # the gate itself gets branch(x) as gradient
    assert f"{len(BRANCH)} of them exactly zero" in caplog.text and "re-checked" in caplog.text

    audit = train(TinyNetGated(), 3)
    assert audit.grad_flow_ok is True and audit.zero_grad == BRANCH and audit.zero_grad_pending == []
    assert audit.zero_grad_cleared_at == {name: 2 for name in BRANCH}  # the gate moved on step 1
    assert audit.zero_grad_checked_to == 2  # nothing left to check after step 2
    json.dumps(audit.to_json())  # what trainability.json and checkpoints/last.pt hold


def test_a_low_rank_adapter_with_zero_b_passes():
    model = nn.Sequential(LowRank(8, 16), nn.ReLU(), nn.Linear(16, 3))
    audit = train(model, 2)
    assert audit.zero_grad == ["0.lora_a"] and audit.zero_grad_cleared_at == {"0.lora_a": 2}
    assert audit.grad_flow_ok is True


def test_a_path_that_never_opens_fails_after_zero_grad_steps():
    audit = train(TinyNetDeadBranch(), ZERO_GRAD_STEPS - 1)  # not yet: it may still open
    assert audit.grad_flow_ok is None and audit.zero_grad_pending == ["dead.weight", "dead.bias"]

    audit = GradAudit()
    with pytest.raises(AuditError) as info:
        train(TinyNetDeadBranch(), ZERO_GRAD_STEPS + 3, audit=audit)
    problem = info.value.problem
    assert problem.startswith(f"2 trainable parameter(s) have a gradient that is present but exactly zero on each of "
                              f"the first {ZERO_GRAD_STEPS} optimizer steps: dead.weight, dead.bias")
    assert "zero-initialised or zero-gated path" in problem and "dead activation" in problem
    assert "initialise the gate/scale non-zero" in info.value.fix and "policy.allow_no_grad" in info.value.fix
    assert audit.grad_flow_ok is False and audit.zero_grad_checked_to == ZERO_GRAD_STEPS
    assert audit.no_grad == [] and audit.zero_grad_cleared_at == {}


def test_allow_no_grad_exempts_both_kinds():
    class Both(TinyNetDeadBranch):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(4, 4)

    audit = train(Both(), ZERO_GRAD_STEPS + 1, allow=["unused", "dead.*"])
    assert audit.grad_flow_ok is True and audit.no_grad == [] and audit.zero_grad == []
    assert sorted(audit.allowed_no_grad) == ["dead.bias", "dead.weight", "unused.bias", "unused.weight"]


def test_non_finite_gradients_still_fail_on_step_1():
    model = nn.Linear(8, 3)
    model(torch.full((2, 8), float("inf"))).sum().backward()
    audit = GradAudit()
    with pytest.raises(AuditError, match=r"non-finite \(NaN/Inf\) gradients on the first step in: weight"):
        audit_gradients(model, [], audit)
    assert audit.grad_flow_ok is False


def test_the_recheck_norms_only_the_pending_tensors_in_one_batch(monkeypatch):
    model = TinyNetGated()
    audit = train(model, 1)
    calls = []
    original = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda tensors, *a, **k: calls.append(len(tensors)) or original(tensors, *a, **k))
    backward_once(model)
    assert recheck_zero_gradients(model, audit, 2) is True  # settled at this step
    assert calls == [len(BRANCH)]
    model.zero_grad(set_to_none=True)
    backward_once(model)
    assert recheck_zero_gradients(model, audit, 3) is False and calls == [len(BRANCH)]  # nothing left: no work


def test_dry_run_fails_on_grad_none_and_reports_exactly_zero(caplog):
    model = TinyNetUnused()
    backward_once(model)
    with pytest.raises(AuditError, match=r"received no gradient on the dry run's batches: unused.weight, unused.bias"):
        audit_gradients(model, [], GradAudit(), dry_run=True)

    model = TinyNetGated()
    backward_once(model)
    audit = GradAudit()
    with caplog.at_level(logging.WARNING, logger="finetune.audit"):
        audit_gradients(model, [], audit, dry_run=True)
    assert "exactly zero on the dry run's batches; re-checked over the first training steps" in caplog.text
    assert BRANCH[0] in caplog.text
    assert audit.checked and audit.grad_flow_ok is None and audit.zero_grad == BRANCH
    assert audit.zero_grad_checked_to == 0  # no optimizer step was checked


# ---- in-process runs -------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_timm_resnet_with_zero_init_last_trains_from_scratch(compose, tmp_path, caplog):
    """timm's ResNet zero-initialises each block's last BatchNorm weight: the rest of every residual
    branch gets an exactly-zero gradient on step 1, and a non-zero one from step 2."""
    from finetune.run import run

    cfg = compose(["model=timm_resnet_zero_init", "data=images32_classes", "checkpoint=none", "trainer.epochs=2",
                   "trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false"])
    assert cfg.model.base.zero_init_last is True
    with caplog.at_level(logging.INFO):
        summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 4
    audit = read_json(tmp_path / "run" / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and audit["no_grad"] == [] and audit["zero_grad_pending"] == []
    expected = {f"layer{i}.0.{p}" for i in range(1, 5)
                for p in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight")}
    assert set(audit["zero_grad"]) == expected
    assert audit["zero_grad_cleared_at"] == {name: 2 for name in audit["zero_grad"]}
    assert "16 trainable tensors exactly zero on step 1, non-zero by step 2" in caplog.text


def test_a_low_rank_model_with_zero_b_trains(tiny_cfg, tmp_path):
    """LoRA-like lora_b = 0: lora_a's gradient is exactly zero on step 1, non-zero from step 2."""
    from finetune.run import run

    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("model=tiny_lowrank", "trainer.epochs=1", ckpt=None), run_dir)
    assert summary["status"] == "completed"
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and audit["zero_grad"] == ["layer2.0.lora_a"]
    assert audit["zero_grad_cleared_at"] == {"layer2.0.lora_a": 2}


def test_the_pending_recheck_is_restored_from_checkpoints_last_pt(compose, tmp_path):
    """Saved after step 1 with the re-check pending, resumed: step 2 re-checks (no fresh audit) and settles it."""
    from finetune.distributed import SINGLE
    from finetune.loop import optimizer_step, train_step
    from finetune.model import build_model
    from finetune.policy import apply_plan, optimizer_defaults, plan_training
    from finetune.session import open_session
    from finetune.state import LAST, rng_state, save_training_state

    cfg = compose(["model=tiny_gated", "data=tiny", "checkpoint=none", "trainer.progress=false"])

    def session(resume_from=None):
        torch.manual_seed(cfg.seed)
        model, _ = build_model(cfg.model)
        lr, wd = optimizer_defaults(cfg.optim.optimizer)
        plan = plan_training(model, {n: "new" for n, _ in model.named_parameters()}, cfg.policy, lr, wd)
        apply_plan(model, plan)
        return open_session(cfg, tmp_path, model, plan, GradAudit(), resume_from, SINGLE, lr, wd)

    s = session()
    batches = iter(s.train_loader)
    train_step(s, s.model, next(batches), closes_step=True)
    optimizer_step(s)
    assert s.audit.zero_grad_pending == BRANCH and s.audit.grad_flow_ok is None
    assert read_json(tmp_path / "trainability.json")["audit"]["zero_grad_pending"] == BRANCH
    save_training_state(tmp_path / LAST, s.training_state([rng_state()]))
    s.metrics_log.close()

    resumed = session(resume_from=tmp_path / LAST)
    assert resumed.progress.audit_done and resumed.audit.zero_grad_pending == BRANCH
    train_step(resumed, resumed.model, next(iter(resumed.train_loader)), closes_step=True)
    optimizer_step(resumed)  # step 2: re-checked, not audited afresh
    assert resumed.audit.zero_grad_cleared_at == {name: 2 for name in BRANCH} and resumed.audit.grad_flow_ok is True
    audit = read_json(tmp_path / "trainability.json")["audit"]  # rewritten when the re-check settled
    assert audit["grad_flow_ok"] is True and audit["zero_grad_pending"] == []
    resumed.metrics_log.close()


def test_a_dead_branch_fails_the_run_at_zero_grad_steps(tiny_cfg, tmp_path):
    from finetune.run import run

    run_dir = tmp_path / "run"
    with pytest.raises(AuditError, match="present but exactly zero"):
        run(tiny_cfg("model=tiny_dead", ckpt=None), run_dir)  # 8 steps planned
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is False and audit["zero_grad_pending"] == ["dead.weight", "dead.bias"]
    assert audit["zero_grad_checked_to"] == ZERO_GRAD_STEPS
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["steps"] == ZERO_GRAD_STEPS - 1
    assert not (run_dir / "model.safetensors").exists()


def test_training_that_ends_before_the_recheck_warns_without_failing(tiny_cfg, tmp_path, caplog):
    from finetune.run import run

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="finetune.audit"):
        summary = run(tiny_cfg("model=tiny_dead", "trainer.max_steps=2", ckpt=None), run_dir)
    assert summary["status"] == "completed"
    assert "training ended after 2 optimizer step(s), before the 5-step re-check" in caplog.text
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is None and audit["zero_grad_pending"] == ["dead.weight", "dead.bias"]


@pytest.mark.slow
def test_under_ddp_every_rank_takes_the_same_decision(tiny_cfg, tmp_path):
    """The re-check reads the all-reduced gradients: two ranks settle the zero-gated branch at the
    same step (and end in sync), and fail a path that never opens at the same step."""
    from finetune.errors import FinetuneError
    from finetune.run import run

    ddp = ["data.batch_size=8", "trainer.nproc=2", "trainer.epochs=1", "trainer.tensorboard=false"]
    summary = run(tiny_cfg("model=tiny_gated", *ddp, ckpt=None), tmp_path / "gated")
    assert summary["status"] == "completed" and summary["ranks_in_sync"] is True
    audit = read_json(tmp_path / "gated" / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and audit["zero_grad_cleared_at"] == {name: 2 for name in BRANCH}

    with pytest.raises(FinetuneError, match="present but exactly zero"):
        run(tiny_cfg("model=tiny_dead", *ddp, "trainer.epochs=2", ckpt=None), tmp_path / "dead")  # 8 steps planned
    audit = read_json(tmp_path / "dead" / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is False and audit["zero_grad_checked_to"] == ZERO_GRAD_STEPS
