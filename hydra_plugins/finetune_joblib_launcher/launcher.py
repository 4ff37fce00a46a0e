"""Hydra's joblib launcher, made to survive a job that dies hard.

A job whose process is killed (`os.abort()`, a segfault in native code, the OOM killer) breaks
joblib's worker pool: the stock launcher then raises `TerminatedWorkerError` and the whole sweep
ends with no summary. This launcher (selected by `hydra/launcher=joblib`: finetune's
`conf/hydra/launcher/joblib.yaml` takes that name and points here) runs the jobs as the stock one does and, when the pool breaks, finds
the job that killed it by running the jobs that were in flight one at a time, records it as
failed (its `summary.json` says how the process died; it returns NaN like any failed job), and
launches the rest again. Jobs that had completed are skipped on the way (sweep.completed_result).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as StockJoblibLauncher
from omegaconf import open_dict

log = logging.getLogger(__name__)


class JoblibLauncher(StockJoblibLauncher):
    """Hydra scans (imports) every plugin module on each start: joblib itself is imported only when
    this launcher launches (`_core` imports it, ~0.1 s)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Joblib.Parallel(n_jobs=%s) is launching %d jobs, sweep output dir: %s",
                 self.joblib.get("n_jobs"), len(job_overrides), self.config.hydra.sweep.dir)
        for i, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
        jobs = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
        results: dict[int, JobReturn] = {}
        while len(results) < len(jobs):
            pending = [i for i in jobs if i not in results]
            try:
                results.update(zip(pending, self._run(pending, jobs, self.joblib)))
            except TerminatedWorkerError as exc:
                died = _exit_codes(exc)
                started = [i for i in pending if self._started_unfinished(i, jobs[i])]
                log.error("a job's process died (%s): running the %d job(s) in flight one at a time to find it",
                          died, len(started))
                for i in started or pending[:1]:
                    try:
                        results[i] = self._run_alone(i, jobs[i])
                    except TerminatedWorkerError as alone:
                        results[i] = self._record_death(i, jobs[i], _exit_codes(alone))
        return [results[i] for i in sorted(results)]

    def _run(self, indices: list[int], jobs: dict[int, list[str]], joblib_cfg: dict) -> list[JobReturn]:
        from joblib import Parallel, delayed

        from hydra_plugins.hydra_joblib_launcher import _core

        joblib_cfg = {**joblib_cfg, "backend": "loky"}  # as the stock launcher: threads do not suit Hydra
        _core.process_joblib_cfg(joblib_cfg)
        state = Singleton.get_state()
        return Parallel(**joblib_cfg)(
            delayed(_core.execute_job)(i, jobs[i], self.hydra_context, self.config, self.task_function, state)
            for i in indices
        )

    def _run_alone(self, idx: int, overrides: list[str]) -> JobReturn:
        """One job in a worker process of its own (joblib with n_jobs=1 would run it in this one)."""
        from joblib.externals.loky import get_reusable_executor

        from hydra_plugins.hydra_joblib_launcher import _core

        executor = get_reusable_executor(max_workers=1)
        job = executor.submit(_core.execute_job, idx, overrides, self.hydra_context, self.config, self.task_function,
                              Singleton.get_state())
        return job.result()

    def _job_config(self, idx: int, overrides: list[str]):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
        return cfg

    def _job_dir(self, cfg) -> Path:
        HydraConfig.instance().set_config(cfg)  # the subdir may interpolate hydra.job.*
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _started_unfinished(self, idx: int, overrides: list[str]) -> bool:
        from finetune.run_files import previous_status

        job_dir = self._job_dir(self._job_config(idx, overrides))
        return job_dir.is_dir() and previous_status(job_dir) not in ("completed", "failed", "dry_run")

    def _record_death(self, idx: int, overrides: list[str], died: str) -> JobReturn:
        from finetune.run_files import Summary

        cfg = self._job_config(idx, overrides)
        job_dir = self._job_dir(cfg)
        error = (f"the job's process died ({died}): killed by the system (out of memory?), a crash in native "
                 "code, or os.abort(); its log is finetune.log in this directory")
        log.error("job %d failed: %s", idx, error)
        job_dir.mkdir(parents=True, exist_ok=True)
        Summary("failed", error=error).write(job_dir)
        from finetune.sweep import SummaryLock, write_sweep_summary

        with SummaryLock(job_dir.parent):
            write_sweep_summary(job_dir.parent, plot=False)
        return JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=None, working_dir=str(job_dir),
                         task_name=cfg.hydra.job.name, status=JobStatus.COMPLETED, _return_value=math.nan)


def _exit_codes(exc: BaseException) -> str:
    """'exit code SIGABRT(-6)' from loky's message, else the message's first line."""
    found = re.search(r"exit codes? of the workers (?:is|are) \{(.*?)\}", str(exc))
    return f"exit code {found.group(1)}" if found else str(exc).splitlines()[0]
