"""MLflow tracking (`logger=[csv,mlflow]`): one MLflow run per finetune run, a parent run per sweep.

What a run sends: its resolved config flattened into params (`optim.optimizer.lr`, `model.add.0.op`),
every value metrics.csv gets, with its step (`train/loss`, `train/lr`, `val/<metric>`), and at the
end the reports (load_report.json, trainability.json, export_report.json, summary.json) and
curves.png as artifacts, the weights' path as the tag `finetune.weights`, and the status summary.json
holds (completed: FINISHED, failed: FAILED, interrupted: KILLED).

Training never waits for MLflow: values go into a bounded in-memory queue, and a background thread
imports mlflow (never at import of finetune), opens the run and sends them in batches
(`MlflowClient.log_batch`) every `flush_every_s`. A tracking failure -- a bad URI, a server down or
too slow, a full disk -- is one warning, and the run goes on to its own end; the end waits for
MLflow at most `close_timeout_s`.

Where runs go: `tracking_uri`, by default `sqlite:///<output root>/mlflow.db` with artifacts in
`mlartifacts/` beside it; the output root is the directory finetune started in (the one holding
outputs/ and multirun/), so every run and sweep started there is in one database. A run records
its MLflow run in `mlflow_run.json`: a resume continues that same run. A sweep's jobs record their
parent in `mlflow_parent_run.json` in the sweep directory: the first job creates it (under a file
lock, so parallel jobs of the joblib launcher share it), `MlflowSweepCallback` ends it.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
RUN_FILE = "mlflow_run.json"  # in the run directory: {tracking_uri, experiment_id, run_id}
PARENT_FILE = "mlflow_parent_run.json"  # in a sweep directory: the same, of the sweep's parent run
ARTIFACTS = ("load_report.json", "trainability.json", "export_report.json", "summary.json", "curves.png")
SWEEP_ARTIFACTS = ("sweep_summary.csv", "sweep_summary.md")  # as the last job left them
MAX_PENDING = 100_000  # values waiting to be sent; more are dropped (and counted) rather than held
BATCH = 1000  # MLflow's limit of metrics per log_batch
PARAM_BATCH = 100  # and of params
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value's length
NAME_MAX = 250  # and on a key's


# ---- where a run goes --------------------------------------------------------------------------


@dataclass
class Place:
    """An MLflow store and experiment, and the lock its setup is done under (sqlite: one file)."""

    tracking_uri: str
    experiment_name: str
    artifact_location: str | None
    lock: Path | None


@dataclass
class Job:
    """What Hydra says about this process's job: where outputs are rooted, and the sweep it is in."""

    output_root: Path
    sweep_dir: Path | None = None
    label: str | None = None  # "<job number>: <overrides>" of a sweep job


def hydra_job() -> Job:
    """The Hydra job running this code, or (a run in-process, without Hydra's app) the working directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return Job(Path.cwd())
    hydra_cfg = HydraConfig.get()
    root = Path(hydra_cfg.runtime.cwd or Path.cwd())
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return Job(root)
    sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
    swept = swept_overrides(list(hydra_cfg.overrides.task), sweep_dir)
    return Job(root, sweep_dir, f"{hydra_cfg.job.num}: {' '.join(swept)}".strip())


def swept_overrides(job_overrides: list[str], sweep_dir: Path) -> list[str]:
    """The job's overrides that the sweep varies: the keys the whole sweep (its multirun.yaml, which
    Hydra's launchers write) swept or did not give (a sweeper's own params); all when unreadable."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        given = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
        parsed = OverridesParser.create().parse_overrides(list(given))
    except Exception:  # noqa: BLE001 -- a name for the run, not worth failing for
        return job_overrides
    fixed = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
    return [o for o in job_overrides if o.split("=", 1)[0] not in fixed] or job_overrides


def place_of(settings, output_root: Path) -> Place:
    uri = settings.tracking_uri or f"sqlite:///{(output_root / 'mlflow.db').resolve()}"
    database = sqlite_file(uri)
    artifacts = settings.artifact_location
    if artifacts is None and database is not None:
        artifacts = str(database.parent / "mlartifacts")
    lock = database.parent / f"{database.name}.lock" if database is not None else None
    return Place(uri, settings.experiment_name, artifacts, lock)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def run_name(settings, run_dir: Path, job: Job) -> str:
    """logger.mlflow.run_name; else a sweep job's label, or the run directory (under the output root: relative)."""
    return settings.run_name or job.label or name_of_dir(run_dir, job.output_root)


def name_of_dir(directory: Path, root: Path) -> str:
    try:
        return str(directory.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(directory.resolve())


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A resolved config as MLflow params: dotted keys (list items by index, as in overrides), values
    as YAML writes scalars, cut to MLflow's limits."""
    if isinstance(config, dict) and config:
        out = {}
        for key, value in config.items():
            out.update(flat_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(config, list) and config:
        out = {}
        for i, value in enumerate(config):
            out.update(flat_params(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {mlflow_name(prefix): yaml_scalar(config)[:PARAM_VALUE_MAX]}


def yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):  # empty
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)


def mlflow_name(name: str) -> str:
    """MLflow accepts letters, digits and `_-. /:` in names (params, metrics, tags)."""
    return re.sub(r"[^\w\-. /:]", "_", name)[:NAME_MAX]


# ---- records in the run and sweep directories --------------------------------------------------


def read_record(path: Path, place: Place) -> dict | None:
    """A recorded MLflow run of the same tracking URI and experiment, else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tracking_uri") != place.tracking_uri \
            or record.get("experiment_name") != place.experiment_name:
        return None
    return record


def write_record(path: Path, place: Place, experiment_id: str, run_id: str) -> None:
    from finetune.state import write_json

    write_json(path, {"tracking_uri": place.tracking_uri, "experiment_name": place.experiment_name,
                      "experiment_id": experiment_id, "run_id": run_id})


class FileLock:
    """An exclusive flock on `path` (None: no lock): processes set up the same store one at a time
    (a new sqlite database, an experiment, a sweep's parent run)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __enter__(self):
        if self.path is not None:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.file.close()


# ---- the client side (these run in the background thread, or at a sweep's end) ----------------


def client_for(place: Place):
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    return MlflowClient(tracking_uri=place.tracking_uri)


def experiment_id(client, place: Place) -> str:
    found = client.get_experiment_by_name(place.experiment_name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(place.experiment_name, artifact_location=place.artifact_location)


def sweep_parent(client, place: Place, experiment: str, sweep_dir: Path, job: Job) -> str:
    """The sweep's parent run: the one its directory records, or a new one (the first job makes it)."""
    record = read_record(sweep_dir / PARENT_FILE, place)
    if record is not None and record.get("experiment_id") == experiment:
        if client.get_run(record["run_id"]).info.status != "RUNNING":  # a sweep run again: it runs again
            client.update_run(record["run_id"], status="RUNNING")
        return record["run_id"]
    parent = client.create_run(experiment, run_name=name_of_dir(sweep_dir, job.output_root),
                               tags={"finetune.sweep_dir": str(sweep_dir)})
    write_record(sweep_dir / PARENT_FILE, place, experiment, parent.info.run_id)
    return parent.info.run_id


@dataclass
class Opened:
    run_id: str
    continued: bool = False  # the run mlflow_run.json recorded (a resume): it has the earlier values
    params_known: dict[str, str] = field(default_factory=dict)  # a continued run's params


def open_run(place: Place, settings, run_dir: Path, job: Job):
    """(client, this run's MLflow run): the one mlflow_run.json records (a resume continues it), or a
    new one, a child of the sweep's parent in a sweep. Under the lock: the client's first use creates
    a new sqlite database (parallel jobs would each start its migrations)."""
    with FileLock(place.lock or (job.sweep_dir / ".mlflow.lock" if job.sweep_dir else None)):
        client = client_for(place)
        return client, open_locked(client, place, settings, run_dir, job)


def open_locked(client, place: Place, settings, run_dir: Path, job: Job) -> Opened:
    experiment = experiment_id(client, place)
    record = read_record(run_dir / RUN_FILE, place)
    if record is not None and record.get("experiment_id") == experiment:
        run = client.get_run(record["run_id"])
        client.update_run(run.info.run_id, status="RUNNING")
        return Opened(run.info.run_id, True, dict(run.data.params))
    tags = {"finetune.run_dir": str(run_dir.resolve()), **{mlflow_name(k): str(v) for k, v in settings.tags.items()}}
    if job.sweep_dir is not None:
        tags["mlflow.parentRunId"] = sweep_parent(client, place, experiment, job.sweep_dir, job)
    run = client.create_run(experiment, run_name=run_name(settings, run_dir, job), tags=tags)
    write_record(run_dir / RUN_FILE, place, experiment, run.info.run_id)
    return Opened(run.info.run_id)


def log_params(client, run_id: str, params: dict[str, str], known: dict[str, str]) -> None:
    """Params once per run (MLflow refuses to change one): a continued run gets the new keys, and
    the keys a resume changed (trainer.epochs raised, ...) as the tag `finetune.resume_changes`."""
    from mlflow.entities import Param

    new = [Param(k, v) for k, v in params.items() if k not in known]
    for start in range(0, len(new), PARAM_BATCH):
        client.log_batch(run_id, params=new[start:start + PARAM_BATCH])
    changed = {k: [known[k], v] for k, v in params.items() if k in known and known[k] != v}
    if changed:
        client.set_tag(run_id, "finetune.resume_changes", json.dumps(changed)[:5000])


# ---- the logger ------------------------------------------------------------------------------


@dataclass
class _End:
    status: str


class MlflowLog:
    """Values in, batches out from a background thread. `log` never blocks; `end` waits at most
    `close_timeout_s`. The first failure is one warning; after it, values are dropped."""

    def __init__(self, settings, run_dir: Path, params: dict[str, str], earlier: list[tuple[str, float, int]], job: Job):
        self.settings = settings
        self.run_dir = run_dir
        self.place = place_of(settings, job.output_root)
        self._job = job
        self._params = params
        self._earlier = earlier  # (name, value, step) a resumed run logged before: sent first
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self._failed = threading.Event()
        self._warned = threading.Lock()
        self._warning_given = False
        self.dropped = 0
        self.run_id: str | None = None
        self._thread = threading.Thread(target=self._work, name="finetune-mlflow", daemon=True)
        self._thread.start()
        log.info("MLflow: logging to %s, experiment %r", self.place.tracking_uri, self.place.experiment_name)

    # -- the training side --
    def log(self, step: int, name: str, value: float) -> None:
        if self._failed.is_set():
            return
        try:
            self._queue.put_nowait((name, float(value), int(time.time() * 1000), step))
        except queue.Full:
            self.dropped += 1

    def end(self, status: str) -> None:
        """After summary.json: flush, send the artifacts, set the status; at most close_timeout_s."""
        deadline = time.monotonic() + self.settings.close_timeout_s
        if not self._failed.is_set():
            try:
                self._queue.put(_End(status), timeout=self.settings.close_timeout_s)
            except queue.Full:
                pass
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._warn(f"MLflow at {self.place.tracking_uri} did not finish within logger.mlflow.close_timeout_s="
                       f"{self.settings.close_timeout_s:g} s: its run may lack values, artifacts or its status. "
                       "The run itself is complete; metrics.csv holds every value")
        elif self.dropped and not self._failed.is_set():
            self._warn(f"MLflow was too slow: {self.dropped} values were not sent (metrics.csv holds them all)")

    # -- the background thread --
    def _work(self) -> None:
        try:
            client, opened = open_run(self.place, self.settings, self.run_dir, self._job)
            self.run_id = opened.run_id
            log_params(client, opened.run_id, self._params, opened.params_known)
            if not opened.continued:  # a resume that turned MLflow on: what metrics.csv holds so far
                now = int(time.time() * 1000)
                self._send(client, [(name, value, now, step) for name, value, step in self._earlier])
            while True:
                values, end = self._next_batch()
                self._send(client, values)
                if end is not None:
                    self._finish(client, end.status)
                    return
        except Exception as exc:  # noqa: BLE001 -- whatever MLflow raises, training goes on
            self._failed.set()
            first = str(exc).strip().splitlines()
            self._warn(f"MLflow tracking stopped ({self.place.tracking_uri}): {type(exc).__name__}: "
                       f"{first[0][:300] if first else ''}. Training goes on; metrics.csv holds every value")

    def _next_batch(self) -> tuple[list, _End | None]:
        """Values for one log_batch: what arrives within flush_every_s, at most BATCH; or the end."""
        deadline = time.monotonic() + self.settings.flush_every_s
        values: list = []
        while len(values) < BATCH:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(item, _End):
                return values, item
            values.append(item)
        return values, None

    def _send(self, client, values: list) -> None:
        from mlflow.entities import Metric

        for start in range(0, len(values), BATCH):
            metrics = [Metric(mlflow_name(name), value, stamp, step) for name, value, stamp, step in values[start:start + BATCH]]
            client.log_batch(self.run_id, metrics=metrics)

    def _finish(self, client, status: str) -> None:
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                client.log_artifact(self.run_id, str(self.run_dir / name))
        weights = self.run_dir / "model.safetensors"
        if weights.is_file():
            client.set_tag(self.run_id, "finetune.weights", str(weights.resolve()))
        client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))

    def _warn(self, message: str) -> None:
        with self._warned:
            if self._warning_given:
                return
            self._warning_given = True
        log.warning("%s", message)


def warm_up(settings) -> None:
    """Import mlflow and open its store -- a new sqlite database runs its migrations -- on a thread of
    its own while the model and data are built: seconds of CPU that would otherwise compete with the
    first training steps. MlflowLog's thread then finds both done (mlflow caches the store)."""

    def work() -> None:
        try:
            place = place_of(settings, job.output_root)
            with FileLock(place.lock):
                client_for(place)
        except Exception:  # noqa: BLE001 -- MlflowLog meets it again and gives the one warning
            pass

    job = hydra_job()
    threading.Thread(target=work, name="finetune-mlflow-warm-up", daemon=True).start()


def start_mlflow(cfg, run_dir: Path, earlier: list[tuple[str, float, int]]) -> MlflowLog:
    """The MLflow logger of a run (`earlier`: values a resumed run logged up to its checkpoint)."""
    from omegaconf import OmegaConf

    params = flat_params(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return MlflowLog(cfg.logger.mlflow, Path(run_dir), params, earlier, hydra_job())


# ---- a sweep's parent run ------------------------------------------------------------------------


class MlflowSweepCallback(Callback):
    """Hydra callback: when a multirun ends, end its MLflow parent run (FINISHED when every job
    completed, else FAILED) with the sweep summary as artifacts. The jobs create the parent run."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        settings = config.get("logger", {}).get("mlflow")
        sweep_dir = Path(config.hydra.sweep.dir)
        if settings is None or not settings.enabled or not (sweep_dir / PARENT_FILE).is_file():
            return
        place = place_of(settings, Path(config.hydra.runtime.cwd or Path.cwd()))
        record = read_record(sweep_dir / PARENT_FILE, place)
        if record is None:
            return
        ender = threading.Thread(target=end_parent, args=(place, record["run_id"], sweep_dir), daemon=True)
        ender.start()
        ender.join(timeout=settings.close_timeout_s)
        if ender.is_alive():
            log.warning("MLflow at %s did not answer within %g s: the sweep's parent run was not ended",
                        place.tracking_uri, settings.close_timeout_s)


def end_parent(place: Place, run_id: str, sweep_dir: Path) -> None:
    from finetune.sweep import job_dirs, job_row

    try:
        client = client_for(place)
        rows = [job_row(d) for d in job_dirs(sweep_dir)]
        for name in SWEEP_ARTIFACTS:
            if (sweep_dir / name).is_file():
                client.log_artifact(run_id, str(sweep_dir / name))
        status = "FINISHED" if rows and all(r["status"] == "completed" for r in rows) else "FAILED"
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()
        log.warning("MLflow (%s): the sweep's parent run was not ended: %s: %s", place.tracking_uri,
                    type(exc).__name__, first[0][:300] if first else "")


def earlier_values(rows: list[dict]) -> list[tuple[str, float, int]]:
    """metrics.csv rows as (name, value, step) for MLflow."""
    return [(f"{r['split']}/{r['name']}", r["value"], r["step"]) for r in rows]

