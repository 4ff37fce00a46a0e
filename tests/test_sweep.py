"""A real `finetune --multirun`: one failing job does not lose the others; sweep_summary.csv has a
row per job saying how it ended; `finetune-summary` rewrites it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS_CONF = Path(__file__).parent / "conf"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_with_a_failing_job_and_summary(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    common = ["--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
              f"checkpoint.path={tiny_ckpts.safetensors}", "trainer.epochs=1", "trainer.progress=false",
              f"hydra.sweep.dir={sweep}"]
    # The basic launcher runs both jobs; the one with a bad freeze glob fails, the other completes.
    done = cli("finetune", "--multirun", *common, "policy.freeze=[layer1],[nope]")
    assert done.returncode != 0  # Hydra reports the failed job at the end
    assert (sweep / "0" / "model.safetensors").is_file()
    assert not (sweep / "sweep_summary.csv").exists()  # Hydra skips on_multirun_end after a failure

    summarized = cli("finetune-summary", str(sweep))
    assert summarized.returncode == 0, summarized.stderr
    rows = read_rows(sweep / "sweep_summary.csv")
    assert [r["job"] for r in rows] == ["0", "1"]
    assert rows[0]["status"] == "completed" and rows[0]["metric"] == "val/acc" and 0 <= float(rows[0]["best"]) <= 1
    assert "policy.freeze=[layer1]" in rows[0]["overrides"]
    assert rows[1]["status"] == "failed" and "nope" in rows[1]["error"]

    ok_sweep = tmp_path / "ok"
    done = cli("finetune", "--multirun", *common[:-1], f"hydra.sweep.dir={ok_sweep}", "optim.optimizer.lr=1e-3,3e-3")
    assert done.returncode == 0, done.stderr
    rows = read_rows(ok_sweep / "sweep_summary.csv")  # written by the callback this time
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_summary_of_a_missing_directory_is_one_message(cli, tmp_path):
    done = cli("finetune-summary", str(tmp_path / "nope"))
    assert done.returncode == 2 and "not a directory" in done.stderr and "Traceback" not in done.stderr
