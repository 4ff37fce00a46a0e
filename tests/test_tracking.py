"""The `logger` group and MLflow tracking, read back with MlflowClient (no mocks): params, metric
history with steps, artifacts, status (completed, interrupted, resumed); a sweep's parent and child
runs (the basic launcher in this process; the joblib launcher's test in test_sweep.py tracks its jobs
too: parallel processes, one parent); a bad URI, an unreachable
and a hanging server each give one warning and a completed run.

mlflow is imported once for the whole file (every test here shares this process)."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from finetune.errors import ConfigError
from finetune.metrics_log import read_metrics, tensorboard_wanted
from finetune.run import run

TESTS_CONF = Path(__file__).parent / "conf"
MLFLOW = ["logger=[csv,mlflow]", "logger.mlflow.flush_every_s=0.2"]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite database for the file's runs (creating one costs ~2 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def history(mlflow_client, run: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run, name))


def csv_history(run_dir: Path, name: str) -> list[tuple[int, float]]:
    split, metric = name.split("/", 1)
    return sorted((r["step"], r["value"]) for r in read_metrics(run_dir / "metrics.csv")
                  if r["split"] == split and r["name"] == metric)


def same_history(mlflow_values, csv_values) -> bool:
    return [s for s, _ in mlflow_values] == [s for s, _ in csv_values] and \
        all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for (_, a), (_, b) in zip(mlflow_values, csv_values))


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "MLflow" in r.getMessage()]


# ---- the logger group ----------------------------------------------------------------------------


def test_logger_group_selects_any_of_csv_tensorboard_mlflow(compose):
    chosen = lambda *o: {k for k, v in compose(list(o)).logger.items() if v.get("enabled", True)}  # noqa: E731
    assert chosen() == {"csv", "tensorboard"}  # the default: [csv, tensorboard]
    assert chosen("logger=[csv,mlflow]") == {"csv", "mlflow"}
    assert chosen("logger=[tensorboard,mlflow]") == {"csv", "tensorboard", "mlflow"}  # csv has no switch: always on
    cfg = compose(["logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=http://tracking:5000",
                   "+logger.mlflow.tags.team=vision"])
    assert cfg.logger.mlflow.tracking_uri == "http://tracking:5000" and cfg.logger.mlflow.tags == {"team": "vision"}

    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # each one's settings are a schema
        compose(["logger=[csv,mlflow]", "logger.mlflow.tracking_url=x"])
    with pytest.raises(ConfigCompositionException):
        compose(["logger.csv.enabled=false"])  # metrics.csv cannot be turned off
    from finetune.config import check_loggers

    with pytest.raises(ConfigError, match="does not list mlflow"):  # set but not selected: refused, not ignored
        check_loggers(compose(["logger.mlflow.experiment_name=mine"]).logger)


def test_trainer_tensorboard_still_decides_where_it_is_set():
    assert tensorboard_wanted(None, listed=True) and not tensorboard_wanted(None, listed=False)
    assert not tensorboard_wanted(False, listed=True)  # existing configs that turned it off
    assert tensorboard_wanted(True, listed=False)


def test_csv_is_written_whatever_is_listed(tiny_cfg, tmp_path):
    assert run(tiny_cfg("logger=[tensorboard]", "trainer.epochs=1"), tmp_path)["status"] == "completed"
    assert (tmp_path / "metrics.csv").is_file() and any((tmp_path / "tensorboard").iterdir())
    assert not (tmp_path / "mlflow_run.json").exists()


# ---- a run in MLflow -----------------------------------------------------------------------------


def test_a_run_in_mlflow_has_its_config_metrics_reports_weights_and_status(tiny_cfg, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    lora = ("model.add=[{op: replace, at: head, module: {_target_: torch.nn.Linear, in_features: 16, out_features: 3}}, "
            "{op: after, at: layer1, name: adapter1, module: {_target_: finetune.modules.Adapter, channels: 16, spatial: false}}, "
            "{op: lora, at: 'layer*', rank: 4}]")  # a lora run also writes export_report.json
    cfg = tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={tracking_uri}", "logger.mlflow.experiment_name=read_back",
                   "+logger.mlflow.tags.team=vision", lora, "policy=lora")
    assert run(cfg, run_dir)["status"] == "completed"

    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_run(run_id(run_dir))
    assert found.info.status == "FINISHED"
    assert mlflow_client.get_experiment(found.info.experiment_id).name == "read_back"
    params = found.data.params
    assert params["optim.optimizer.lr"] == str(cfg.optim.optimizer.lr)
    assert (params["model.add.0.op"], params["model.add.2.at"]) == ("replace", "layer*")
    assert params["checkpoint.path"] == str(cfg.checkpoint.path)
    assert (params["trainer.epochs"], params["trainer.grad_accum"], params["seed"]) == ("2", "1", "0")  # not true/false
    assert (params["dry_run"], params["trainer.max_steps"], params["checkpoint.remap"]) == ("false", "null", "[]")
    assert (params["policy.freeze.0"], params["checkpoint.expect.unexpected"]) == ("*", "[]")  # list items by index
    assert found.data.tags["team"] == "vision"
    assert found.data.tags["finetune.weights"] == str((run_dir / "model.safetensors").resolve())
    for name in ("train/loss", "train/lr", "val/loss", "val/acc"):  # every value metrics.csv has, at its step
        assert same_history(history(mlflow_client, found.info.run_id, name), csv_history(run_dir, name)), name
    assert len(csv_history(run_dir, "train/loss")) >= 4  # log_every=1: one per step
    artifacts = {a.path for a in mlflow_client.list_artifacts(found.info.run_id)}
    assert {"load_report.json", "trainability.json", "export_report.json", "summary.json", "curves.png"} <= artifacts
    assert not (run_dir / "tensorboard").exists()  # not listed


def test_default_database_is_under_the_output_root(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the directory finetune starts in holds outputs/, multirun/ and mlflow.db
    assert run(tiny_cfg(*MLFLOW, "trainer.epochs=1"), tmp_path / "outputs" / "day" / "run")["status"] == "completed"
    record = json.loads((tmp_path / "outputs" / "day" / "run" / "mlflow_run.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    found = client(record["tracking_uri"]).get_run(record["run_id"])
    assert found.info.run_name == "outputs/day/run" and found.info.status == "FINISHED"
    assert found.info.artifact_uri.startswith(str(tmp_path / "mlartifacts")) or \
        found.info.artifact_uri.startswith(f"file://{tmp_path / 'mlartifacts'}")


def interrupting(marker: Path) -> list[str]:
    """A real SIGINT in the middle of epoch 1 (once per marker file)."""
    return ["+data.train.interrupt_after=20", f"+data.train.interrupt_marker={marker}"]


def test_interrupted_run_is_killed_in_mlflow_and_its_resume_continues_the_same_run(tiny_cfg, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    cfg = lambda: tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={tracking_uri}", *interrupting(tmp_path / "marker"))  # noqa: E731
    assert run(cfg(), run_dir)["status"] == "interrupted"
    first = run_id(run_dir)
    mlflow_client = client(tracking_uri)
    assert mlflow_client.get_run(first).info.status == "KILLED"

    assert run(cfg(), run_dir)["status"] == "completed"
    assert run_id(run_dir) == first and mlflow_client.get_run(first).info.status == "FINISHED"
    for name in ("train/loss", "val/acc"):  # nothing twice: the interrupted run stopped at its checkpoint
        assert same_history(history(mlflow_client, first, name), csv_history(run_dir, name)), name


def test_a_resume_that_turns_mlflow_on_sends_what_came_before(tiny_cfg, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    interrupt = interrupting(tmp_path / "marker")
    assert run(tiny_cfg("logger=[csv]", *interrupt), run_dir)["status"] == "interrupted"
    summary = run(tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={tracking_uri}", *interrupt), run_dir)
    assert summary["status"] == "completed" and "logger.mlflow.enabled" in summary["resume_changes"]
    mlflow_client = client(tracking_uri)
    assert same_history(history(mlflow_client, run_id(run_dir), "train/loss"), csv_history(run_dir, "train/loss"))
    assert csv_history(run_dir, "train/loss")[0][0] == 1  # from the first step, before the resume


# ---- failures are one warning; the run completes -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_tracking_uri_is_one_warning_and_the_run_completes(tiny_cfg, tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"  # under a regular file: no database there
    with caplog.at_level(logging.WARNING):
        assert run(tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={uri}", "trainer.epochs=1"), tmp_path / "run")["status"] == "completed"
    assert len(tracking_warnings(caplog)) == 1 and uri in tracking_warnings(caplog)[0]
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / "mlflow_run.json").exists()


def test_an_unreachable_server_is_one_warning_and_the_run_completes(tiny_cfg, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own setting: fail at the first refusal
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING):
        assert run(tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={uri}", "trainer.epochs=1"), tmp_path / "run")["status"] == "completed"
    assert len(tracking_warnings(caplog)) == 1 and "Training goes on" in tracking_warnings(caplog)[0]


def test_a_server_that_never_answers_does_not_hold_the_run(tiny_cfg, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with socket.socket() as hanging, caplog.at_level(logging.WARNING):
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(8)  # connections are accepted by the kernel, and never answered
        uri = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        started = time.perf_counter()
        summary = run(tiny_cfg(*MLFLOW, f"logger.mlflow.tracking_uri={uri}", "logger.mlflow.close_timeout_s=1",
                               "trainer.epochs=1"), tmp_path / "run")
        took = time.perf_counter() - started
    assert summary["status"] == "completed" and took < 60  # not the 120 s MLflow would wait
    assert len(tracking_warnings(caplog)) == 1 and "close_timeout_s" in tracking_warnings(caplog)[0]


# ---- sweeps: a parent run, a child per job -------------------------------------------------------


def sweep_args(sweep: Path, uri: str, *extra: str) -> list[str]:
    return ["--multirun", "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
            "checkpoint.path=null", "trainer.epochs=1", "trainer.progress=false", *MLFLOW,
            f"logger.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={sweep}", "optim.optimizer.lr=1e-3,3e-3", *extra]


def parent_and_children(uri: str, sweep: Path):
    mlflow_client = client(uri)
    parent = mlflow_client.get_run(json.loads((sweep / "mlflow_parent_run.json").read_text())["run_id"])
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return mlflow_client, parent, sorted(children, key=lambda r: r.info.run_name)


@pytest.fixture
def hydra_app_state():
    """Hydra's app configures the root logger and keeps its last job's HydraConfig: put both back
    for the tests after (an in-process run must not look like a job of this sweep)."""
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    HydraConfig.instance().cfg = None


def test_a_sweep_is_a_parent_run_with_a_child_per_job(tmp_path, tracking_uri, hydra_app_state):
    from finetune.commands.finetune import main

    sweep = tmp_path / "sweep"  # the basic launcher: the jobs run in this process, one after the other
    assert main(sweep_args(sweep, tracking_uri, "logger.mlflow.experiment_name=sweeps")) == 0
    mlflow_client, parent, children = parent_and_children(tracking_uri, sweep)
    assert parent.info.status == "FINISHED"
    assert {"sweep_summary.csv", "sweep_summary.md"} <= {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert [c.info.run_name for c in children] == ["0: optim.optimizer.lr=0.001", "1: optim.optimizer.lr=0.003"]
    assert [c.data.params["optim.optimizer.lr"] for c in children] == ["0.001", "0.003"]
    assert all(c.info.status == "FINISHED" and "val/acc" in c.data.metrics for c in children)
    assert [run_id(sweep / str(n)) for n in (0, 1)] == [c.info.run_id for c in children]
