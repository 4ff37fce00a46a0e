"""Faults done for real on the `finetune` command: SIGKILL then resume, SIGTERM, a
second signal, and a checkpoint write that fails. A resumed run must end bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import command_line
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TESTS_CONF = Path(__file__).parent / "conf"


def command(run_dir: Path, ckpt: Path, *extra: str, delay: float = 0.01) -> list[str]:
    return [*command_line.command("finetune"), "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
            f"checkpoint.path={ckpt}", "optim=adamw_cosine", "trainer.epochs=4", "trainer.progress=false",
            "trainer.checkpoint_every=3", "trainer.tensorboard=false", f"+data.train.delay={delay}",
            f"hydra.run.dir={run_dir}", *extra]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, min_step: int, timeout: float = 60) -> int:
    """Poll until checkpoints/last.pt holds at least `min_step` optimizer steps; returns them."""
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if last.exists():
            try:
                step = torch.load(last, map_location="cpu", weights_only=True)["progress"]["step"]
            except Exception:  # being replaced right now: atomic rename, so retry
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def straight_run(tmp_path, cli_env, tiny_ckpts) -> Path:
    run_dir = tmp_path / "straight"
    done = subprocess.run(command(run_dir, tiny_ckpts.safetensors), env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_sigkill_then_rerun_resumes_bit_identical(tmp_path, cli_env, tiny_ckpts, straight_run):
    run_dir = tmp_path / "killed"
    cmd = command(run_dir, tiny_ckpts.safetensors)
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = wait_for_checkpoint(run_dir, proc, min_step=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "summary.json").exists() or json.loads((run_dir / "summary.json").read_text())["status"] != "completed"

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)  # the same command
    assert again.returncode == 0, again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"]["step"] >= step
    assert same_weights(run_dir / "model.safetensors", straight_run / "model.safetensors")


def test_sigterm_stops_at_a_step_boundary_then_resumes(tmp_path, cli_env, tiny_ckpts, straight_run):
    run_dir = tmp_path / "termed"
    cmd = command(run_dir, tiny_ckpts.safetensors)
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc, min_step=3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "resume with the same command" in err and "Traceback" not in out + err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not (run_dir / "model.safetensors").exists()
    saved = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["progress"]["step"] == summary["steps"]  # the checkpoint is the step it stopped at

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"]["step"] == summary["steps"]
    assert same_weights(run_dir / "model.safetensors", straight_run / "model.safetensors")


def test_second_signal_exits_at_once(tmp_path, cli_env, tiny_ckpts):
    run_dir = tmp_path / "twice"
    proc = subprocess.Popen(command(run_dir, tiny_ckpts.safetensors, delay=0.2),
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run_dir / "finetune.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "gradient audit" in log.read_text()):  # training is under way (steps of ~3 s)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert time.monotonic() - start < 2.0  # did not wait for the ~3 s step to finish
    assert proc.returncode == -signal.SIGINT


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs) that can be filled up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Write zeros until the filesystem is full, then give back `leave` bytes."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_disk, cli_env, tiny_ckpts):
    """Once the first last.pt (~40 KB) is written, the disk is filled to within 16 KB: small writes
    (log lines, metrics rows) still fit, the next checkpoint does not. The run stops with one clear
    message; the earlier checkpoint is intact and loadable."""
    run_dir = small_disk / "run"
    cmd = command(run_dir, tiny_ckpts.safetensors, "trainer.checkpoint_every=null", delay=0.02)
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc, min_step=4)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    fill(small_disk, leave=16 * 1024)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), "the run finished although the disk was full"
    assert "Traceback" not in out + err
    assert "could not write" in err and "No space left on device" in err, err[-2000:]
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before  # the previous checkpoint, intact
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written temp file left
    assert not (run_dir / "model.safetensors").exists()
