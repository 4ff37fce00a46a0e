"""DDP: sharding and collectives, then real 2-process CPU runs (trainer.nproc=2 in-process, and
torchrun through the installed command) checked against one process with the same global batch.

Tolerance: the model without BatchNorm (tiny_nobn) trains the same on 1 process with batch 2B
and on 2 with batch B up to float32 summation order: per-step losses and final weights agree to
rtol 1e-4 (measured: identical to the 6 digits metrics.csv keeps).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data import EpochSampler, ShardSampler
from finetune.errors import RunDirError, TrainingError
from finetune.run import run
from finetune.signals import StopRequest

TESTS_CONF = Path(__file__).parent / "conf"
NO_BN = ["model=tiny_nobn", "checkpoint.ignore=['^layer1[.]1[.]']", "trainer.tensorboard=false"]
RTOL = 1e-4


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["split"] == "train" and r["name"] == "loss"]


def val_metrics(run_dir: Path) -> list[tuple[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["name"], float(r["value"])) for r in csv.DictReader(f) if r["split"] == "val"]


def assert_same_training(one: Path, two: Path) -> None:
    assert train_losses(two) == pytest.approx(train_losses(one), rel=RTOL)
    assert [n for n, _ in val_metrics(two)] == [n for n, _ in val_metrics(one)]
    assert [v for _, v in val_metrics(two)] == pytest.approx([v for _, v in val_metrics(one)], rel=RTOL)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()  # the same names as one process: no `module.` prefix
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=1e-6)


# ---- sharding (no processes) -------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 61, 1])
def test_two_shards_hold_the_one_process_order_batch_by_batch(size):
    one = list(EpochSampler(size, seed=3))
    shards = [EpochSampler(size, seed=3, rank=r, world_size=2) for r in range(2)]
    for shard in shards:
        shard.set_epoch(1)
    lists = [list(s) for s in shards]
    assert len(lists[0]) == len(lists[1]) == len(shards[0]) == -(-size // 2)  # equal, padded
    interleaved = [i for pair in zip(*lists) for i in pair]
    assert interleaved[:size] == one  # global batch k of 2 ranks × B == batch k of one process × 2B
    assert interleaved[size:] == one[: len(interleaved) - size]  # padding: the epoch's first samples again


def test_shards_follow_the_epoch_and_skip_what_was_seen():
    shard = EpochSampler(64, seed=0, rank=1, world_size=2)
    shard.set_epoch(2)
    epoch2 = list(shard)
    shard.set_epoch(1)
    assert list(shard) != epoch2
    shard.set_epoch(2, start=10)
    assert list(shard) == epoch2[10:] and len(shard) == 22


def test_validation_shards_count_every_sample_once():
    shards = [list(ShardSampler(47, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(47))


def test_a_repeated_signal_within_the_grace_is_the_same_request():
    with StopRequest(repeat_grace_s=5.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded copy: must not kill the process
    assert stop.received == signal.SIGTERM


# ---- collectives on 2 real processes -----------------------------------------------------------


@pytest.mark.slow
def test_collectives_on_two_processes():
    from tiny import ddp_collectives

    from finetune.distributed import spawn

    found = spawn(ddp_collectives, 2, "cpu")
    assert len(found) == 2
    for rank in found:
        assert rank["in_sync"] is True
        assert rank["drifted_in_sync"] is False  # one bit of one parameter on one rank is caught
        assert rank["stopped_at"] == 4  # a stop asked on rank 1 in step 3: every rank stops in step 4
        assert rank["any"] is True and rank["sum"] == 3.0


# ---- trainer.nproc=2 in-process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_ckpts):
    """The reference: one process, batch 16."""
    from conftest import TINY_TRAIN, compose_config

    run_dir = tmp_path_factory.mktemp("one") / "run"
    cfg = compose_config([*TINY_TRAIN, f"checkpoint.path={tiny_ckpts.safetensors}", *NO_BN, "data.batch_size=16"])
    assert run(cfg, run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.slow
def test_nproc_2_matches_one_process_with_the_same_global_batch(tiny_cfg, one_process, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a stray file of another rank would land
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    summary = run(tiny_cfg(*NO_BN, "data.batch_size=8", "trainer.nproc=2"), run_dir)
    assert time.perf_counter() - started < 30
    assert summary["status"] == "completed"
    written = read_json(run_dir / "summary.json")
    assert written["world_size"] == 2 and written["ranks_in_sync"] is True
    assert written["steps"] == read_json(one_process / "summary.json")["steps"] == 8  # optimizer steps
    assert_same_training(one_process, run_dir)
    assert list(tmp_path.iterdir()) == [run_dir]  # one run directory, nothing else anywhere
    one_files = sorted(str(p.relative_to(one_process)) for p in one_process.rglob("*"))
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == one_files
    assert read_json(one_process / "summary.json")["ranks_in_sync"] is None  # one process: not applicable


@pytest.mark.slow
def test_probe_then_unfreeze_under_ddp_matches_one_process(tiny_cfg, tmp_path):
    policy = ["policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(tiny_cfg(*NO_BN, *policy, "data.batch_size=16"), one)
    summary = run(tiny_cfg(*NO_BN, *policy, "data.batch_size=8", "trainer.nproc=2"), two)
    assert summary["status"] == "completed" and summary["ranks_in_sync"] is True
    # The DDP wrapper was rebuilt at the unfreeze: the pretrained layers trained (and in sync) after it.
    assert_same_training(one, two)
    audit = read_json(two / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and audit["frozen_unchanged"] is True
    assert [u["epoch"] for u in audit["unfrozen"]] == [2]


@pytest.mark.slow
def test_interrupt_then_resume_under_ddp_is_exact(tiny_cfg, tmp_path):
    marker = tmp_path / "sigint-sent"
    interrupting = ["+data.train.interrupt_after=10", f"+data.train.interrupt_marker={marker}",
                    "trainer.nproc=2", "data.batch_size=8"]
    run_dir = tmp_path / "run"
    first = run(tiny_cfg(*interrupting), run_dir)  # some rank gets SIGINT in step 2 (of 4 in epoch 1): all stop at step 3
    assert first["status"] == "interrupted" and 0 < first["steps"] < 4
    saved = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["progress"]["step"] == first["steps"] and len(saved["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in saved["model"])

    with pytest.raises(RunDirError, match="2 process"):  # mid-epoch: the shards need the same number of ranks
        run(tiny_cfg(*interrupting[:-2], "data.batch_size=8"), run_dir)

    second = run(tiny_cfg(*interrupting), run_dir)
    assert second["status"] == "completed" and second["resumed_from"]["step"] == first["steps"]
    straight = tmp_path / "straight"
    run(tiny_cfg(*interrupting), straight)  # marker exists: no interruption
    resumed, uninterrupted = load_file(str(run_dir / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_ranks_out_of_sync_fail_loudly(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="ranks_in_sync=false"):
        run(tiny_cfg("model=tiny_base", "model.base._target_=tiny.DriftOnRank1", "model.base.num_classes=3",
                     "trainer.nproc=2", "data.batch_size=8", "trainer.epochs=1", ckpt=None), run_dir)
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["ranks_in_sync"] is False and summary["world_size"] == 2
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_a_failing_worker_comes_back_as_one_error(tiny_cfg, tmp_path):
    started = time.perf_counter()
    # An OSError reading a sample is an unreadable sample: a user error, named with its rank and the cause.
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"rank 1: data.train: sample \d+ cannot be read \(OSError: simulated read error on rank 1\)"):
        run(tiny_cfg("data.train._target_=tiny.failing_on_rank1", "+data.train.after=20", "trainer.nproc=2",
                     "data.batch_size=8"), tmp_path / "run")
    assert time.perf_counter() - started < 30  # rank 0 did not wait out a collective's timeout


def test_skip_nonfinite_is_refused_under_ddp(tiny_cfg, tmp_path):
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="skip_nonfinite"):
        run(tiny_cfg("trainer.skip_nonfinite=true", "trainer.nproc=2"), tmp_path / "run")


# ---- the installed command ---------------------------------------------------------------------


def _exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def tiny_overrides(ckpt: Path) -> list[str]:
    return ["--config-dir", str(TESTS_CONF), "data=tiny", "checkpoint=tiny", f"checkpoint.path={ckpt}",
            "trainer.epochs=2", "trainer.progress=false", "trainer.log_every=1", *NO_BN]


@pytest.mark.slow
def test_torchrun_two_processes_share_one_run_dir(tmp_path, cli_env, tiny_ckpts, one_process):
    started = time.perf_counter()
    done = subprocess.run([_exe("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "finetune",
                           *tiny_overrides(tiny_ckpts.safetensors), "data.batch_size=8"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.perf_counter() - started < 30
    # One timestamped run directory, chosen by rank 0; rank 1 wrote nothing anywhere.
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "finetune.log").is_file()
    assert "Traceback" not in done.stderr and "[rank1]" not in done.stderr  # no warnings on rank 1 either
    assert_same_training(one_process, run_dir)


@pytest.mark.slow
def test_sigterm_stops_an_nproc_run_with_a_resumable_checkpoint(tmp_path, cli_env, tiny_ckpts):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([_exe("finetune"), *tiny_overrides(tiny_ckpts.safetensors), "trainer.nproc=2",
                             "data.batch_size=8", "trainer.epochs=20", "+data.train.delay=0.01", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "finetune.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "gradient audit" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to rank 0 only: the others stop with it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert "resume with the same command" in err and "Traceback" not in out + err
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted" and summary["world_size"] == 2
    saved = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["progress"]["step"] == summary["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_nproc_inside_a_multirun(tmp_path, cli, tiny_ckpts, launcher):
    """Basic launcher: two jobs in one process (a process group per job); joblib: jobs in loky workers."""
    sweep = tmp_path / "sweep"
    done = cli("finetune", "--multirun", *tiny_overrides(tiny_ckpts.safetensors), *launcher, "trainer.epochs=1",
               "trainer.nproc=2", "data.batch_size=8", f"hydra.sweep.dir={sweep}", "seed=0,1")
    assert done.returncode == 0, done.stdout + done.stderr
    for job in ("0", "1"):
        summary = read_json(sweep / job / "summary.json")
        assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["ranks_in_sync"] is True
