"""Real `finetune --multirun` sweeps: the basic, joblib and submitit_local launchers, the Optuna
sweeper, one failing job not losing the others, the sweep summary (csv, md, png) and
`finetune-summary`, resumable sweeps (a real SIGINT mid-sweep, then the same command again), and
run directories that never collide."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import command_line
import pytest

from finetune.paths import reserve_dir

TESTS_CONF = Path(__file__).parent / "conf"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny(ckpt: Path, sweep: Path, *extra: str) -> list[str]:
    return ["--multirun", "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
            f"checkpoint.path={ckpt}", "trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false",
            f"hydra.sweep.dir={sweep}", *extra]


def summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


# ---- pure parts ----------------------------------------------------------------------------------


def test_reserve_dir_never_hands_out_a_directory_twice(tmp_path):
    base = str(tmp_path / "outputs" / "12-00-00")
    got = [reserve_dir(base) for _ in range(3)]
    assert got == [base, f"{base}_1", f"{base}_2"] and all(Path(p).is_dir() for p in got)


def test_limit_threads_gives_each_parallel_job_its_share():
    import os

    import torch

    from finetune.sweep import limit_threads

    before = torch.get_num_threads()
    try:
        cores = os.cpu_count()
        assert limit_threads({"n_jobs": 2}) == max(1, cores // 2)
        assert limit_threads({"n_jobs": -1}) == 1
        assert limit_threads({"cpus_per_task": 3}) == 3
    finally:
        torch.set_num_threads(before)


def test_summary_of_jobs_that_failed_or_never_finished(tmp_path):
    from finetune.sweep import write_sweep_summary

    def job(name: str, overrides: list[str], summary: dict | None, mode: str = "max"):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (d / ".hydra" / "config.yaml").write_text(f"trainer:\n  mode: {mode}\n")
        if summary is not None:
            (d / "summary.json").write_text(json.dumps(summary))
        if summary is not None and summary["status"] == "completed":  # a completed run has its weights
            import torch
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))

    ok = {"status": "completed", "best": {"metric": "val/acc", "value": 0.5, "epoch": 2}, "wall_s": 1.0, "torch_threads": 1}
    job("0", ["optim.optimizer.lr=0.001"], ok)
    job("1", ["optim.optimizer.lr=0.01"], {**ok, "best": {"metric": "val/acc", "value": 0.75, "epoch": 1}})
    job("2", ["optim.optimizer.lr=0.1"], {"status": "failed", "error": "loss is NaN at step 3\nmore"})
    job("10", ["optim.optimizer.lr=1.0"], None)  # killed before it wrote a summary
    (tmp_path / "not_a_job").mkdir()
    rows, best = write_sweep_summary(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # numeric order, non-job dirs ignored
    assert best["job"] == "1"
    assert rows[2]["error"] == "loss is NaN at step 3" and rows[3]["status"] == "missing"
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "**Best: job 1**" in md and "| 1 ★ | completed | 0.7500 |" in md and "loss is NaN" in md
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert read_rows(tmp_path / "sweep_summary.csv")[1]["threads"] == "1"


def hydra_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from finetune.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_provided_slurm_launcher_and_search_configs_compose():
    from omegaconf import OmegaConf

    slurm = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu" and slurm.tasks_per_node == 1
    assert slurm.cpus_per_task == 8 and slurm.gpus_per_node == 1
    search = hydra_config("hydra/sweeper=search", "trainer.mode=min", "trainer.monitor=val/loss").hydra.sweeper
    assert search._target_.endswith("OptunaSweeper") and search.direction == "minimize"
    assert set(OmegaConf.to_container(search.params)) == {"optim.optimizer.lr", "policy.new_lr_mult", "policy"}
    assert hydra_config("hydra/sweeper=search").hydra.sweeper.direction == "maximize"


# ---- real sweeps ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_basic_launcher_failing_job_keeps_the_others_and_the_summary(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    # Four jobs: NaN loss x (good freeze glob, bad glob). The sweep runs them all.
    done = cli("finetune", *tiny(tiny_ckpts.safetensors, sweep), "policy.freeze=[layer1],[nope]",
               "+data.train.nan_at=0,null")
    assert done.returncode == 1, done.stderr  # a job failed: the sweep says so in its exit status
    assert "Traceback" not in done.stderr
    rows = read_rows(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["failed", "completed", "failed", "failed"]
    assert "loss is nan" in rows[0]["error"]
    assert "nope" in rows[2]["error"] and "nope" in rows[3]["error"]
    assert rows[1]["metric"] == "val/acc" and 0 <= float(rows[1]["best"]) <= 1
    assert (sweep / "1" / "model.safetensors").is_file() and not (sweep / "0" / "model.safetensors").exists()
    assert (sweep / "sweep_summary.md").is_file() and (sweep / "sweep.png").is_file()
    assert "best: job 1" in done.stdout and "3 of 4 jobs did not complete" in done.stdout

    (sweep / "sweep_summary.csv").unlink()
    summarized = cli("finetune-summary", str(sweep))
    assert summarized.returncode == 0, summarized.stderr
    assert [r["status"] for r in read_rows(sweep / "sweep_summary.csv")] == ["failed", "completed", "failed", "failed"]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes_with_their_share_of_threads(cli, tmp_path, tiny_ckpts):
    import os

    sweep = tmp_path / "sweep"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a new database: the parallel jobs create it one at a time
    done = cli("finetune", *tiny(tiny_ckpts.safetensors, sweep), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               "optim.optimizer.lr=1e-3,3e-3,1e-2", "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri={tracking}")
    assert done.returncode == 0, done.stderr
    rows = read_rows(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["completed"] * 3
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(summary(sweep / r["job"])["torch_threads"] == threads for r in rows)
    assert len({summary(sweep / r["job"])["wall_s"] for r in rows}) >= 1
    assert not (tmp_path / "multirun").exists()  # every job went to the one sweep dir
    # MLflow: the jobs, each in its own process, are the children of one parent run
    assert "WARNING" not in done.stdout + done.stderr
    from mlflow.tracking import MlflowClient

    mlflow_client = MlflowClient(tracking_uri=tracking)
    parent = mlflow_client.get_run(json.loads((sweep / "mlflow_parent_run.json").read_text())["run_id"])
    children = mlflow_client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["optim.optimizer.lr"] for c in children) == ["0.001", "0.003", "0.01"]


@pytest.mark.slow
def test_submitit_local_launcher(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    done = cli("finetune", *tiny(tiny_ckpts.safetensors, sweep), "hydra/launcher=submitit_local",
               "optim.optimizer.lr=1e-3,3e-3", timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_rows(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert (sweep / "1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_optuna_search_returns_the_metric_and_resumes(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    # The packaged search: lr, policy.new_lr_mult and the freeze policy (default, linear_probe, probe_then_finetune).
    args = [*tiny(tiny_ckpts.safetensors, sweep), "hydra/sweeper=search", "hydra.sweeper.n_trials=3"]
    done = cli("finetune", *args)
    assert done.returncode == 0, done.stderr
    results = (sweep / "optimization_results.yaml").read_text()
    rows = read_rows(sweep / "sweep_summary.csv")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    best = max(float(r["best"]) for r in rows)  # trainer.mode=max -> direction maximize
    assert f"best_value: {best}" in results
    assert all("policy.new_lr_mult=" in r["overrides"] and "optim.optimizer.lr=" in r["overrides"]
               and "policy=" in r["overrides"] for r in rows)

    stamps = {r["job"]: (sweep / r["job"] / "model.safetensors").stat().st_mtime_ns for r in rows}
    again = cli("finetune", *args[:-1], "hydra.sweeper.n_trials=4")  # the same seeded search, one trial more
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already completed") + again.stdout.count("already completed") == 3
    assert {j: (sweep / j / "model.safetensors").stat().st_mtime_ns for j in stamps} == stamps
    assert len(read_rows(sweep / "sweep_summary.csv")) == 4


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path, cli_env, tiny_ckpts):
    sweep = tmp_path / "sweep"
    cmd = [*command_line.command("finetune"),
           *tiny(tiny_ckpts.safetensors, sweep, "trainer.epochs=4", "+data.train.delay=0.005",
                 "optim.optimizer.lr=1e-3,3e-3,1e-2")]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = sweep / "1" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "job 1 never wrote a checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert summary(sweep / "0")["status"] == "completed"
    assert summary(sweep / "1")["status"] == "interrupted"
    assert not (sweep / "2").exists()
    job0 = (sweep / "0" / "model.safetensors").stat().st_mtime_ns

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert (sweep / "0" / "model.safetensors").stat().st_mtime_ns == job0  # skipped, not retrained
    assert summary(sweep / "1")["status"] == "completed" and summary(sweep / "1")["resumed_from"] is not None
    assert summary(sweep / "2")["status"] == "completed" and summary(sweep / "2")["resumed_from"] is None
    assert [r["status"] for r in read_rows(sweep / "sweep_summary.csv")] == ["completed"] * 3


@pytest.mark.slow
def test_reusing_a_sweep_dir_with_other_settings_is_refused(cli, tmp_path, tiny_ckpts):
    sweep = tmp_path / "sweep"
    assert cli("finetune", *tiny(tiny_ckpts.safetensors, sweep), "optim.optimizer.lr=1e-3").returncode == 0
    before = (sweep / "0" / "summary.json").read_text()
    done = cli("finetune", *tiny(tiny_ckpts.safetensors, sweep), "optim.optimizer.lr=5e-3")
    assert done.returncode != 0 and "holds a completed run of a different config" in done.stderr
    assert "Traceback" not in done.stderr
    assert (sweep / "0" / "summary.json").read_text() == before


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_their_own_directories(cli_env, tmp_path, tiny_ckpts):
    args = [*command_line.command("finetune"), "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
            f"checkpoint.path={tiny_ckpts.safetensors}", "dry_run=true"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/summary.json"))
    assert len(runs) == 3  # same second or not, three runs, three directories


def test_summary_of_a_missing_directory_is_one_message(cli, tmp_path):
    done = cli("finetune-summary", str(tmp_path / "nope"))
    assert done.returncode == 2 and "not a directory" in done.stderr and "Traceback" not in done.stderr
    done = cli("finetune-summary", str(tmp_path))
    assert done.returncode == 2 and "no job directories" in done.stderr
