"""Sweeps that meet hard faults: a job whose process dies (SIGABRT, as a segfault or an OOM kill),
a full disk under the sweep summary, a damaged completed job on a rerun."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS_CONF = Path(__file__).parent / "conf"


def rows(sweep: Path) -> list[dict]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def tiny_sweep(ckpt: Path, sweep: Path, *extra: str) -> list[str]:
    return ["--multirun", "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
            f"checkpoint.path={ckpt}", "trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false",
            f"hydra.sweep.dir={sweep}", *extra]


def test_a_job_that_dies_hard_under_joblib_is_failed_and_the_others_finish(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    done = cli("finetune", *tiny_sweep(tiny_ckpts.safetensors, sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                       "model.base._target_=tiny.TinyNet,tiny.abort_process,tiny.TinyNet,tiny.TinyNet"),
               timeout=400)
    assert done.returncode == 1, done.stdout + done.stderr  # a failed job: the sweep says so, after its summary
    # (the dying process itself may dump its native stack; the sweep adds no traceback of its own)
    assert "TerminatedWorkerError" not in done.stderr and "Traceback (most recent call last)" not in done.stderr
    got = rows(sweep)
    assert [r["status"] for r in got] == ["completed", "failed", "completed", "completed"]
    assert "process died (exit code SIGABRT(-6))" in got[1]["error"]
    died = json.loads((sweep / "1" / "summary.json").read_text())
    assert died["status"] == "failed" and "SIGABRT" in died["error"]
    assert all((sweep / j / "model.safetensors").is_file() for j in ("0", "2", "3"))
    assert (sweep / "sweep_summary.md").is_file()


def fill(directory: Path) -> None:
    """Fill the file system of `directory` to the last byte (a real ENOSPC for the next write)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_under_the_sweep_summary_is_an_error_exit(cli, tmp_path, tiny_ckpts):
    """A real full disk: the finished sweep is copied to a small tmpfs that is then filled up."""
    import shutil

    sweep = tmp_path / "sweep"
    args = tiny_sweep(tiny_ckpts.safetensors, sweep, "optim.optimizer.lr=1e-3,3e-3")
    assert cli("finetune", *args).returncode == 0
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(sweep, mount / "sweep")
        for name in ("sweep_summary.csv", "sweep_summary.md", "sweep.png"):
            (mount / "sweep" / name).unlink()
        fill(mount)
        summary = cli("finetune-summary", str(mount / "sweep"))
        assert summary.returncode != 0, summary.stdout + summary.stderr
        assert summary.stderr.count("error:") == 1 and "Traceback" not in summary.stderr
        assert "No space left on device" in summary.stderr and "free disk space" in summary.stderr
        # The callback that ends every sweep, on the same full disk (a rerun of the command itself would
        # first meet Hydra's own writes of each job's .hydra/).
        probe = ("import sys; from omegaconf import OmegaConf; from finetune.sweep import SweepSummaryCallback; "
                 "SweepSummaryCallback().on_multirun_end(OmegaConf.create({'hydra': {'sweep': {'dir': sys.argv[1]}}}))")
        end = cli("python", "-c", probe, str(mount / "sweep"))
        assert end.returncode == 2, end.stdout + end.stderr
        assert end.stderr.count("finetune: error:") == 1 and "Traceback" not in end.stderr
        assert "No space left on device" in end.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_damaged_completed_job_is_reported_in_its_row_on_a_rerun(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    args = tiny_sweep(tiny_ckpts.safetensors, sweep, "optim.optimizer.lr=1e-3,3e-3")
    assert cli("finetune", *args).returncode == 0
    weights = sweep / "0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut: the completed run's weights are damaged
    again = cli("finetune", *args)
    assert "Traceback" not in again.stderr, again.stderr
    assert again.returncode == 1, again.stdout + again.stderr
    got = rows(sweep)
    assert got[0]["status"] == "failed" and "model.safetensors" in got[0]["error"] and "damaged" in got[0]["error"]
    assert got[1]["status"] == "completed"
