"""The training pieces built alone: the train step, the optimizer step, evaluation (exact under
DDP), and the session (cfg → loaders, optimizer, monitor; the restore of a saved state)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.audit import GradAudit
from finetune.distributed import SINGLE
from finetune.loop import evaluate, optimizer_step, train_step
from finetune.model import build_model
from finetune.policy import apply_plan, optimizer_defaults, plan_training
from finetune.session import open_session
from finetune.state import LAST, rng_state, save_training_state
from finetune.task import TaskError

TINY = ["model=tiny", "data=tiny", "checkpoint=none", "trainer.progress=false"]


def session_of(cfg, run_dir, resume_from=None):
    """What run.run does before fit: build the model, plan (every parameter as if loaded, so that
    policy.freeze applies), open the session."""
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model)
    lr, wd = optimizer_defaults(cfg.optim.optimizer)
    plan = plan_training(model, {n: "checkpoint" for n, _ in model.named_parameters()}, cfg.policy, lr, wd)
    apply_plan(model, plan)
    return open_session(cfg, run_dir, model, plan, GradAudit(), resume_from, SINGLE, lr, wd)


def first_batch(s):
    return next(iter(s.train_loader))


# ---- the session -----------------------------------------------------------------------------

def test_session_resolves_the_monitor_and_gives_the_optimizer_every_trainable_param(compose, tmp_path):
    s = session_of(compose([*TINY, "policy.freeze=[layer2.*]"]), tmp_path)
    assert (s.monitor, s.mode) == ("val/acc", "max")  # trainer.monitor=auto: classification's primary metric
    in_optimizer = {id(p) for group in s.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for n, p in s.model.named_parameters() if p.requires_grad}
    assert in_optimizer == trainable and not any(n.startswith("layer2.") for n, p in s.model.named_parameters() if p.requires_grad)
    assert len(s.train_loader) == 4 and len(s.val_loader) == 3  # 64 and 48 samples, batch 16
    s.metrics_log.close()


@pytest.mark.parametrize("monitor, mode", [("val/miou", "auto"), ("val/loss", "min")])
def test_monitor_is_checked_at_start(compose, tmp_path, monitor, mode):
    cfg = compose([*TINY, f"trainer.monitor={monitor}", f"trainer.mode={mode}"])
    if monitor == "val/miou":
        with pytest.raises(TaskError, match=r"trainer.monitor=val/miou, but task classification logs val/loss, val/acc"):
            session_of(cfg, tmp_path)
        assert not (tmp_path / "metrics.csv").exists()  # failed before anything was opened
    else:
        s = session_of(cfg, tmp_path)
        assert (s.monitor, s.mode) == ("val/loss", "min")
        s.metrics_log.close()


def test_restore_puts_back_weights_optimizer_schedule_and_progress(compose, tmp_path):
    cfg = compose([*TINY, "optim=adamw_cosine"])
    s = session_of(cfg, tmp_path)
    train_step(s, s.model, first_batch(s), closes_step=True)
    optimizer_step(s)
    s.progress.batch = 1
    save_training_state(tmp_path / LAST, s.training_state([rng_state()]))
    s.metrics_log.close()

    resumed = session_of(cfg, tmp_path, resume_from=tmp_path / LAST)
    assert resumed.resumed_from == {"epoch": 0, "step": 1}
    assert (resumed.progress.step, resumed.progress.batch, resumed.progress.audit_done) == (1, 1, True)
    for (name, a), (_, b) in zip(s.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.state_dict()["state"].keys() == s.optimizer.state_dict()["state"].keys()
    assert resumed.scheduler.state_dict()["last_epoch"] == s.scheduler.state_dict()["last_epoch"] == 1
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in s.optimizer.param_groups]
    resumed.metrics_log.close()


def test_resuming_into_another_model_config_is_refused(compose, tmp_path):
    from finetune.errors import RunDirError

    s = session_of(compose(TINY), tmp_path)
    save_training_state(tmp_path / LAST, s.training_state([rng_state()]))
    s.metrics_log.close()
    with pytest.raises(RunDirError, match="different model config"):
        session_of(compose([*TINY, "model=tiny_nobn"]), tmp_path, resume_from=tmp_path / LAST)


# ---- the train step and the optimizer step ---------------------------------------------------

def test_train_step_is_forward_and_backward_only(compose, tmp_path):
    s = session_of(compose([*TINY, "policy.freeze=[layer2.*]"]), tmp_path)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    loss, samples = train_step(s, s.model, first_batch(s), closes_step=True)
    assert samples == 16 and loss.dim() == 0 and not loss.requires_grad and math.isfinite(loss.item())
    for name, p in s.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed without an optimizer step"
        assert (p.grad is not None) == p.requires_grad, name  # frozen layer2 gets none
    assert s.progress.step == 0
    s.metrics_log.close()


def test_gradient_accumulation_equals_one_large_batch(compose, tmp_path):
    """Two micro-batches of 8 under grad_accum=2 give the gradient of one batch of 16 (the loss is
    a mean, divided by grad_accum before backward)."""
    s = session_of(compose([*TINY, "data.batch_size=16", "trainer.grad_accum=2"]), tmp_path)
    s.model.eval()  # BatchNorm statistics of 8 and of 16 samples differ: compare the gradients alone
    x, y = first_batch(s)
    train_step(s, s.model, (x[:8], y[:8]), closes_step=False)
    train_step(s, s.model, (x[8:], y[8:]), closes_step=True)
    accumulated = {n: p.grad.clone() for n, p in s.model.named_parameters()}
    s.optimizer.zero_grad(set_to_none=True)
    s.cfg.trainer.grad_accum = 1
    train_step(s, s.model, (x, y), closes_step=True)
    for name, p in s.model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    s.metrics_log.close()


def test_a_non_finite_batch_is_skipped_with_batchnorm_statistics_restored(compose, tmp_path):
    s = session_of(compose([*TINY, "trainer.skip_nonfinite=true"]), tmp_path)
    x, y = first_batch(s)
    x[0, 0] = float("nan")
    stats = {n: b.clone() for n, b in s.model.named_buffers()}
    assert train_step(s, s.model, (x, y), closes_step=True) == (None, 0)
    assert s.progress.skipped_nonfinite == 1
    for name, b in s.model.named_buffers():
        assert torch.equal(b, stats[name]), f"{name} moved on a skipped batch"
    assert all(p.grad is None for p in s.model.parameters())  # no backward
    s.metrics_log.close()


def test_optimizer_step_audits_the_first_step_and_writes_trainability(compose, tmp_path):
    s = session_of(compose([*TINY, "model=tiny_unused"]), tmp_path)  # a trainable module outside forward
    train_step(s, s.model, first_batch(s), closes_step=True)
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="no gradient"):
        optimizer_step(s)
    s.metrics_log.close()

    s = session_of(compose(TINY), tmp_path / "ok")
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    train_step(s, s.model, first_batch(s), closes_step=True)
    optimizer_step(s)
    assert s.progress.step == 1 and s.progress.audit_done
    assert all(p.grad is None for p in s.model.parameters())  # zeroed for the next step
    assert any(not torch.equal(p, before[n]) for n, p in s.model.named_parameters())
    audit = json.loads((tmp_path / "ok" / "trainability.json").read_text())["audit"]
    assert audit["grad_flow_ok"] is True and audit["no_grad"] == []
    s.metrics_log.close()


# ---- evaluation: exact for every task, on one process and on two -----------------------------

def test_evaluate_averages_over_targets_not_batches():
    """causal_lm: val/loss is the mean over every non-padding target token of the validation set,
    and perplexity is exactly exp(val/loss)."""
    from task_data import _evaluation_cases, evaluate_every_task

    results = evaluate_every_task(SINGLE)
    model, val = _evaluation_cases()["causal_lm"]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for sample in val:
            ids, labels = sample["input_ids"][None], sample["labels"][None]
            logits = model(input_ids=ids).logits[:, :-1]
            target = labels[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum").item()
            tokens += int((target != -100).sum())
    lm = results["causal_lm"]
    assert lm["loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert lm["perplexity"] == pytest.approx(math.exp(lm["loss"]), rel=1e-6)
    assert set(results["segmentation"]) == {"loss", "miou", "pixel_acc"}
    assert set(results["classification"]) == {"loss", "acc", "top5"}
    assert set(results["multilabel"]) == {"loss", "f1", "map"}
    assert set(results["regression"]) == {"loss", "mae", "mse"}


@pytest.mark.slow
def test_evaluate_on_two_ranks_equals_one_process():
    """Every validation sample counted once under DDP (41 samples: uneven shards and batches),
    metric states reduced by torchmetrics, loss sums all-reduced: the same numbers as one process."""
    from task_data import evaluate_every_task

    from finetune.distributed import spawn

    alone = evaluate_every_task(SINGLE)
    ranks = spawn(evaluate_every_task, 2, "cpu")
    assert ranks.keys() == alone.keys()
    for task, values in alone.items():
        assert ranks[task].keys() == values.keys(), task
        for name, value in values.items():
            assert ranks[task][name] == pytest.approx(value, rel=1e-6, abs=1e-9), f"{task} val/{name}"
