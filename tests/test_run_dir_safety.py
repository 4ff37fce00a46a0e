"""A run directory holds one run, and resumes only what it saved. Every fault is done for real: a
second `finetune` process, SIGKILL and SIGSTOP, flipped and truncated bytes, edited files.

- one run per directory: an exclusive lock (`.finetune.lock`) for the whole run; a second process
  stops with one message naming the holder and leaves the directory byte-identical;
- `checkpoints/last.pt` carries its sha256 (`last.pt.sha256`); a damaged or foreign file is refused
  before any report of the earlier run is touched;
- a resume whose config differs in what changes the result is refused, key by key; settings that
  extend or observe the run may change and are recorded in summary.json (`resume_changes`);
- temp files of a killed write are removed at the next start, and the removal is logged;
- `finetune-eval` refuses a `.hydra/config.yaml` that no longer matches the digest the run recorded,
  unless `--allow-edited-config`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import command_line
import pytest
import torch

from finetune.errors import CheckpointError, RunDirError
from finetune.run_lock import ORPHAN_TEMP
from finetune.run import run
from finetune.state import LAST, digest_path, read_digests, save_training_state

TESTS_CONF = Path(__file__).parent / "conf"
LOCK = ".finetune.lock"
REPORTS = ["summary.json", "trainability.json", "load_report.json", "metrics.csv", "checkpoints/last.pt"]


# ---- helpers ---------------------------------------------------------------------------------------


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` (hidden ones too), by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def one_error(rc: int, out: str, err: str) -> str:
    """A user error as the commands report it: non-zero exit, one `finetune: error:` line, its fix,
    no traceback. Returns stderr."""
    assert rc not in (0, None), err
    assert err.count("finetune: error:") == 1, err
    assert "\n  fix: " in err, err
    assert "Traceback" not in out + err, err
    return err


def finetune_command(run_dir: Path, ckpt: Path, *extra: str, delay: float = 0.0) -> list[str]:
    return [*command_line.command("finetune"), "--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny",
            "checkpoint=tiny", f"checkpoint.path={ckpt}", "trainer.epochs=2", "trainer.progress=false",
            "trainer.tensorboard=false", "trainer.log_every=1", *([f"+data.train.delay={delay}"] if delay else []),
            f"hydra.run.dir={run_dir}", *extra]


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def holds_lock(run_dir: Path, pid: int) -> bool:
    """Whether the lock record names `pid` as the current holder."""
    try:
        record = json.loads((run_dir / LOCK).read_text())
    except (OSError, ValueError):
        return False
    return record.get("pid") == pid and record.get("ended") is None


def interrupting(marker: Path) -> list[str]:
    """SIGINT while the 20th training sample is fetched (epoch 1, batch 2); rerun: no interruption."""
    return ["+data.train.interrupt_after=20", f"+data.train.interrupt_marker={marker}"]


@pytest.fixture
def interrupted(tiny_cfg, tmp_path):
    """A run dir of an interrupted in-process run (checkpoint at step 2), and its overrides."""
    overrides = interrupting(tmp_path / "sigint-sent")
    run_dir = tmp_path / "run"
    first = run(tiny_cfg(*overrides), run_dir)
    assert first["status"] == "interrupted" and (run_dir / LAST).is_file()
    return run_dir, overrides


@pytest.fixture
def processes():
    """Subprocesses a test starts; killed (by their own pid) if still running at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=30)


def start(processes: list, cmd: list[str], env: dict, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    processes.append(proc)
    return proc


# Another process holding a run directory's lock, as `finetune` does (for the in-process checks).
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finetune.distributed import SINGLE
    from finetune.run_lock import hold_run_dir
    with hold_run_dir(Path(sys.argv[1]), SINGLE):
        print("held", flush=True)
        time.sleep(600)
""")

# A write through state.atomic_path that is killed half-way (before its rename).
WRITE_AND_HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finetune.state import write_atomic
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial" * 1000)
            f.flush()
        print("writing", flush=True)
        time.sleep(600)
    write_atomic(Path(sys.argv[1]), write)
""")

# save_training_state killed after the new digest joined the sidecar, before the rename of last.pt.
SAVE_AND_HANG_BEFORE_RENAME = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from finetune import state
    replace = os.replace
    def hang(src, dst):
        if str(dst).endswith("last.pt"):
            print("renaming", flush=True)
            time.sleep(600)
        return replace(src, dst)
    os.replace = hang
    saved = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    saved["progress"]["step"] += 1000  # another state: another digest
    state.save_training_state(Path(sys.argv[1]), saved)
""")


def run_python(processes, cli_env, script: str, *args: str, until: str) -> subprocess.Popen:
    """Start `script` and wait for the line `until` on its stdout."""
    proc = start(processes, [sys.executable, "-c", script, *args], cli_env)
    line = proc.stdout.readline()
    assert line.strip() == until, proc.stderr.read() if proc.poll() is not None else line
    return proc


# ---- 1. one run per directory ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_finetune_on_a_held_dir_is_refused_and_writes_nothing(tmp_path, cli_env, tiny_ckpts, processes):
    """A runs; B (other settings) starts on the same directory while A holds it. A is stopped
    (SIGSTOP) so the directory is still while B runs: B must leave it byte-identical."""
    run_dir = tmp_path / "run"
    a = start(processes, finetune_command(run_dir, tiny_ckpts.safetensors, delay=0.02), cli_env)
    wait_until(lambda: holds_lock(run_dir, a.pid), a, what="A took the run directory")
    a.send_signal(signal.SIGSTOP)
    try:
        before = snapshot(run_dir)
        b = subprocess.run(finetune_command(run_dir, tiny_ckpts.safetensors, "seed=1"), env=cli_env,
                           capture_output=True, text=True, timeout=120)
        after = snapshot(run_dir)
    finally:
        a.send_signal(signal.SIGCONT)
    err = one_error(b.returncode, b.stdout, b.stderr)
    assert f"is in use by another finetune run (pid {a.pid}, started " in err
    assert f"kill -TERM {a.pid}" in err
    assert after == before  # nothing written: its Hydra's .hydra/ files were put back as A's

    out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    assert "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()
    record = read_json(run_dir / LOCK)
    assert record["pid"] == a.pid and record["ended"]  # released when A ended


@pytest.mark.slow
def test_two_finetunes_started_together_leave_one_run(tmp_path, cli_env, tiny_ckpts, processes):
    """Both Hydras write .hydra/ into the directory; one process wins the lock, the other stops with
    one message. The directory then holds the winner's run only: its .hydra/config.yaml, its weights,
    and a config digest finetune-eval accepts."""
    from finetune.commands.eval import evaluate_run

    run_dir = tmp_path / "run"
    procs = {seed: start(processes, finetune_command(run_dir, tiny_ckpts.safetensors, f"seed={seed}", delay=0.03), cli_env)
             for seed in (0, 1)}
    results = {}
    for seed, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[seed] = (proc.returncode, out, err)
    winners = [seed for seed, (rc, _, _) in results.items() if rc == 0]
    assert len(winners) == 1, {seed: err[-1500:] for seed, (_, _, err) in results.items()}
    winner, loser = winners[0], 1 - winners[0]
    err = one_error(*results[loser])
    assert f"pid {procs[winner].pid}" in err
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    assert f"seed: {winner}" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert evaluate_run(run_dir)["metrics"] == pytest.approx(read_json(run_dir / "summary.json")["final"], rel=1e-6)


def test_in_process_run_and_dry_run_on_a_held_dir_are_refused(tiny_cfg, tmp_path, cli_env, processes):
    run_dir = tmp_path / "run"
    holder = run_python(processes, cli_env, HOLD_LOCK, str(run_dir), until="held")
    before = snapshot(run_dir)
    for overrides in [(), ("dry_run=true",), ("trainer.nproc=2",)]:
        with pytest.raises(RunDirError) as info:
            run(tiny_cfg(*overrides), run_dir)
        assert f"pid {holder.pid}" in info.value.problem and "another hydra.run.dir" in info.value.fix
        assert info.value.run_dir_untouched  # for whoever reports it: write nothing there either
        assert snapshot(run_dir) == before

    holder.kill()  # SIGKILL: the kernel drops the lock; the lock file stays, and is free
    holder.wait(timeout=30)
    assert run(tiny_cfg("trainer.epochs=1"), run_dir)["status"] == "completed"
    assert read_json(run_dir / LOCK)["pid"] == os.getpid()


def test_the_lock_is_released_when_a_run_fails(tiny_cfg, tmp_path):
    from finetune.errors import PolicyError

    run_dir = tmp_path / "run"
    with pytest.raises(PolicyError) as info:
        run(tiny_cfg("policy.freeze=[no_such_layer]"), run_dir)
    assert info.value.run_dir_untouched
    assert not run_dir.exists()  # it stopped before writing anything: the lock file went with it
    assert run(tiny_cfg("trainer.epochs=1"), run_dir)["status"] == "completed"


@pytest.mark.slow
def test_a_killed_runs_lock_is_free_and_noted(tmp_path, cli_env, tiny_ckpts, processes):
    run_dir = tmp_path / "run"
    cmd = finetune_command(run_dir, tiny_ckpts.safetensors, "trainer.checkpoint_every=2", delay=0.02)
    a = start(processes, cmd, cli_env)
    wait_until(lambda: (run_dir / LAST).exists(), a, what="a checkpoint")
    a.kill()
    a.wait(timeout=30)
    assert holds_lock(run_dir, a.pid)  # the record says held; the flock died with the process

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["resumed_from"] is not None
    assert f"pid {a.pid}" in (run_dir / "finetune.log").read_text()  # the take-over is logged


# ---- 2. last.pt carries its digest ------------------------------------------------------------------


def test_last_pt_has_its_sha256_beside_it(interrupted):
    run_dir, _ = interrupted
    digest = hashlib.sha256((run_dir / LAST).read_bytes()).hexdigest()
    assert (run_dir / "checkpoints" / "last.pt.sha256").read_text() == f"{digest}  last.pt\n"  # sha256sum's format


@pytest.mark.slow
def test_flipped_bytes_in_last_pt_are_refused_before_any_report(tmp_path, cli_env, tiny_ckpts):
    """The real command: killed with SIGKILL after a checkpoint, bytes of last.pt flipped, rerun."""
    run_dir = tmp_path / "run"
    cmd = finetune_command(run_dir, tiny_ckpts.safetensors, "trainer.checkpoint_every=2", delay=0.02)
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (run_dir / LAST).exists() and (run_dir / "metrics.csv").exists(), proc, what="a checkpoint")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    last = run_dir / LAST
    data = bytearray(last.read_bytes())
    for offset in (len(data) // 3, len(data) // 2):
        data[offset] ^= 0xFF
    last.write_bytes(bytes(data))
    before = snapshot(run_dir)

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    err = one_error(again.returncode, again.stdout, again.stderr)
    assert f"cannot resume from {last}: the file is damaged" in err and "last.pt.sha256" in err
    after = snapshot(run_dir)
    # The kill may land inside a write and leave its temp file: the next start removes those (tested below).
    kept = lambda files: {k: v for k, v in files.items() if k != "finetune.log" and not ORPHAN_TEMP.match(Path(k).name)}
    assert kept(after) == kept(before)
    assert after["finetune.log"].startswith(before["finetune.log"])  # only ever appended to


def test_truncated_last_pt_is_refused_and_reports_kept(interrupted, tiny_cfg):
    run_dir, overrides = interrupted
    last = run_dir / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as info:
        run(tiny_cfg(*overrides), run_dir)
    assert "the file is damaged" in info.value.problem and str(last) in info.value.problem
    assert "trainer.resume=PATH" in info.value.fix
    assert snapshot(run_dir) == before


def test_a_last_pt_without_its_digest_is_refused(interrupted, tiny_cfg):
    run_dir, overrides = interrupted
    digest_path(run_dir / LAST).unlink()
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as info:
        run(tiny_cfg(*overrides), run_dir)
    assert "last.pt.sha256" in info.value.problem and "missing" in info.value.problem
    assert "sha256sum last.pt > last.pt.sha256" in info.value.fix
    assert snapshot(run_dir) == before


class NotData:
    """A pickled object: loading it would need this code (weights_only refuses it)."""


@pytest.mark.parametrize("content, says", [
    (lambda state: {"model": state["model"]}, "it has no optimizer, progress, rng, audit, config"),
    (lambda state: {**state, "config": NotData()}, "not a training state finetune wrote"),
    (lambda state: {**state, "progress": {**state["progress"], "epoch": "one"}}, "its progress has no epoch"),
    (lambda state: [state], "it holds a list"),
], ids=["missing-fields", "needs-code", "bad-progress", "not-a-dict"])
def test_a_foreign_last_pt_is_one_message_naming_it(interrupted, tiny_cfg, content, says):
    """Foreign contents under a valid digest: the format check names the file and the fix."""
    run_dir, overrides = interrupted
    last = run_dir / LAST
    state = torch.load(last, map_location="cpu", weights_only=True)
    save_training_state(last, content(state))
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as info:
        run(tiny_cfg(*overrides), run_dir)
    assert str(last) in info.value.problem and says in info.value.problem
    assert info.value.fix
    assert snapshot(run_dir) == before


def test_another_optimizers_state_is_refused(interrupted, tiny_cfg, tmp_path):
    """From another run (optim=sgd): its saved config says so, refused before any report. Forged
    into this run's file (config untouched): refused as a state that does not fit, not a KeyError."""
    run_dir, overrides = interrupted
    sgd_dir = tmp_path / "sgd"
    run(tiny_cfg("optim=sgd", "trainer.epochs=1"), sgd_dir)
    other = tmp_path / "fresh"
    with pytest.raises(RunDirError) as info:
        run(tiny_cfg(f"trainer.resume={sgd_dir / LAST}"), other)
    assert "different optim config" in info.value.problem
    assert "optim.optimizer._target_: \"torch.optim.SGD\" in the checkpoint, \"torch.optim.AdamW\" now" in info.value.problem
    assert not other.exists()

    last = run_dir / LAST
    state = torch.load(last, map_location="cpu", weights_only=True)
    sgd_state = torch.load(sgd_dir / LAST, map_location="cpu", weights_only=True)
    state["optimizer"] = sgd_state["optimizer"]
    save_training_state(last, state)
    with pytest.raises(CheckpointError) as info:
        run(tiny_cfg(*overrides), run_dir)
    assert str(last) in info.value.problem and "does not fit" in info.value.problem


def test_a_save_killed_before_its_rename_still_resumes(interrupted, tiny_cfg, cli_env, processes):
    """SIGKILL after the new digest joined the sidecar, before last.pt was replaced: the old last.pt
    is still listed, so the run resumes from it (and the orphan temp file goes)."""
    run_dir, overrides = interrupted
    old = (run_dir / LAST).read_bytes()
    saver = run_python(processes, cli_env, SAVE_AND_HANG_BEFORE_RENAME, str(run_dir / LAST), until="renaming")
    saver.kill()
    saver.wait(timeout=30)
    assert (run_dir / LAST).read_bytes() == old
    assert len(read_digests(digest_path(run_dir / LAST))) == 2
    summary = run(tiny_cfg(*overrides), run_dir)
    assert summary["status"] == "completed" and summary["resumed_from"] == {"epoch": 0, "step": 2}
    assert not list(run_dir.rglob("*.tmp"))


# ---- 3. a resume continues the same computation ---------------------------------------------------


def test_a_resume_with_other_settings_is_refused_naming_each_key(interrupted, tiny_cfg):
    run_dir, overrides = interrupted
    before = snapshot(run_dir)
    with pytest.raises(RunDirError) as info:
        run(tiny_cfg(*overrides, "optim.optimizer.lr=0.01", "data.train.n=32", "data.batch_size=8", "seed=1",
                     "trainer.precision=bf16", "trainer.clip_grad_norm=1.0", "trainer.grad_accum=2"), run_dir)
    problem = info.value.problem
    for line in ["optim.optimizer.lr: 0.003 in the checkpoint, 0.01 now", "data.train.n: 64 in the checkpoint, 32 now",
                 "data.batch_size: 16 in the checkpoint, 8 now", "seed: 0 in the checkpoint, 1 now",
                 'trainer.precision: "fp32" in the checkpoint, "bf16" now',
                 "trainer.clip_grad_norm: null in the checkpoint, 1.0 now",
                 "trainer.grad_accum: 1 in the checkpoint, 2 now"]:
        assert line in problem, problem
    assert "resuming would mix two runs" in problem
    assert "optim.optimizer.lr=0.003" in info.value.fix
    assert snapshot(run_dir) == before  # summary.json, trainability.json, load_report.json, metrics.csv, last.pt


def test_a_lowered_epoch_count_is_refused(interrupted, tiny_cfg):
    run_dir, overrides = interrupted
    with pytest.raises(RunDirError, match=r"trainer\.epochs: 2 in the checkpoint, 1 now \(lowered"):
        run(tiny_cfg(*overrides, "trainer.epochs=1"), run_dir)


def test_settings_that_extend_or_observe_the_run_may_change_and_are_recorded(interrupted, tiny_cfg, caplog):
    run_dir, overrides = interrupted
    with caplog.at_level(logging.INFO, logger="finetune"):
        summary = run(tiny_cfg(*overrides, "trainer.epochs=3", "trainer.log_every=2", "trainer.checkpoint_every=5"),
                      run_dir)
    assert summary["status"] == "completed" and summary["epochs"] == 3
    expected = {"trainer.epochs": [2, 3], "trainer.log_every": [1, 2], "trainer.checkpoint_every": [None, 5]}
    assert summary["resume_changes"] == expected == read_json(run_dir / "summary.json")["resume_changes"]
    assert "trainer.epochs: 2 -> 3" in caplog.text


def test_a_resume_with_another_world_size_is_refused(interrupted, tiny_cfg):
    """data.batch_size is per process: another number of processes changes the global batch."""
    from finetune.distributed import World
    from finetune.session import read_resume

    run_dir, overrides = interrupted
    with pytest.raises(RunDirError, match=r"by 1 process\(es\); this run has 2"):
        read_resume(run_dir / LAST, tiny_cfg(*overrides), World(0, 2, 0))


@pytest.mark.slow
def test_the_command_refuses_a_changed_resume_in_one_message(tmp_path, cli_env, tiny_ckpts):
    run_dir = tmp_path / "run"
    cmd = finetune_command(run_dir, tiny_ckpts.safetensors, *interrupting(tmp_path / "sigint-sent"))
    first = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 130, first.stderr
    before = snapshot(run_dir)
    again = subprocess.run([*cmd, "optim.optimizer.lr=0.01"], env=cli_env, capture_output=True, text=True, timeout=120)
    err = one_error(again.returncode, again.stdout, again.stderr)
    assert "optim.optimizer.lr: 0.003 in the checkpoint, 0.01 now" in err
    after = snapshot(run_dir)
    assert after.pop("finetune.log").startswith(before.pop("finetune.log"))
    assert after == before  # .hydra/ too: the refused attempt put the interrupted run's back


# ---- 4. temp files of a killed write ---------------------------------------------------------------


def test_temp_files_of_a_killed_write_are_removed_at_the_next_start(interrupted, tiny_cfg, cli_env, processes, caplog):
    run_dir, overrides = interrupted
    for target in (run_dir / LAST, run_dir / "summary.json"):
        writer = run_python(processes, cli_env, WRITE_AND_HANG, str(target), until="writing")
        writer.kill()
        writer.wait(timeout=30)
    orphans = sorted(run_dir.rglob(".*.tmp"))
    assert sorted(p.name.split(".")[1] for p in orphans) == ["last", "summary"]
    keep = [run_dir / "notes.tmp", run_dir / ".notes.tmp"]  # not atomic_path's names: not ours to remove
    for path in keep:
        path.write_text("mine")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert run(tiny_cfg(*overrides), run_dir)["status"] == "completed"
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)
    for orphan in orphans:
        assert f"removed {orphan.relative_to(run_dir)}" in caplog.text


# ---- 5. commands that rebuild from a run directory -------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_ckpts, finetune_cache) -> Path:
    """One run made by the real command, for the finetune-eval checks (each test works on a copy)."""
    env = {**os.environ, "FINETUNE_CACHE": str(finetune_cache), "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_CONF.parent / "helpers"), *filter(None, [env.get("PYTHONPATH")])])
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = subprocess.run(finetune_command(run_dir, tiny_ckpts.safetensors, "trainer.epochs=1"), env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture
def finished_copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


@pytest.mark.slow
def test_the_run_records_the_digest_of_its_config(finished):
    from safetensors import safe_open

    digest = hashlib.sha256((finished / ".hydra" / "config.yaml").read_bytes()).hexdigest()
    for weights in (finished / "model.safetensors", finished / "checkpoints" / "best.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            assert f.metadata()["config_sha256"] == digest
    assert read_json(finished / LOCK)["config_sha256"] == digest


@pytest.mark.slow
def test_eval_refuses_an_edited_config_before_building_anything(finished_copy, monkeypatch):
    """Even an edit that resolves to the same config (a comment) no longer matches the digest."""
    import finetune.model
    from finetune.commands.eval import evaluate_run

    saved = finished_copy / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text() + "# edited\n")
    built = []

    def build_model(*args, **kwargs):
        built.append(args)
        raise AssertionError("built from an edited config")

    monkeypatch.setattr(finetune.model, "build_model", build_model)
    with pytest.raises(RunDirError) as info:
        evaluate_run(finished_copy)
    assert f"{saved} does not match the config the run trained with" in info.value.problem
    assert "it was edited since the run" in info.value.problem and "sha256" in info.value.problem
    assert "--allow-edited-config" in info.value.fix
    assert built == [] and not (finished_copy / "eval.json").exists()


@pytest.mark.slow
def test_eval_with_allow_edited_config_goes_on_and_says_so(finished_copy, cli):
    saved = finished_copy / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("seed: 0", "seed: 1"))

    refused = cli("finetune-eval", str(finished_copy))
    err = one_error(refused.returncode, refused.stdout, refused.stderr)
    assert f"{saved} does not match" in err and "edited since the run" in err and "it differs at " in err
    assert "--allow-edited-config" in err
    assert not (finished_copy / "eval.json").exists()

    allowed = cli("finetune-eval", str(finished_copy), "--allow-edited-config")
    assert allowed.returncode == 0, allowed.stderr
    assert "edited since the run" in allowed.stderr and "Traceback" not in allowed.stderr
    evaluated = read_json(finished_copy / "eval.json")
    assert "edited since the run" in evaluated["edited_config"][0]
    assert evaluated["metrics"] == pytest.approx(read_json(finished_copy / "summary.json")["final"], rel=1e-6)


@pytest.mark.slow
def test_eval_of_edited_overrides_names_the_flag(finished_copy):
    from finetune.commands.eval import evaluate_run

    overrides = finished_copy / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- data.val.n=40\n")
    with pytest.raises(RunDirError) as info:
        evaluate_run(finished_copy)
    assert "data.val.n" in info.value.problem and "--allow-edited-config" in info.value.fix
    result = evaluate_run(finished_copy, allow_edited_config=True)
    assert result["samples"] == 40 and "data.val.n" in result["edited_config"][0]


@pytest.mark.slow
def test_eval_of_a_run_without_a_recorded_digest_compares_the_config(finished_copy):
    """Weights written before the digest was recorded: the file's resolved content is compared, so a
    comment passes and a changed value does not."""
    from safetensors.torch import load_file, save_file

    from finetune.commands.eval import evaluate_run
    from finetune.finished import recorded_metadata

    weights = finished_copy / "model.safetensors"
    metadata = recorded_metadata(weights)
    metadata.pop("config_sha256")
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    saved = finished_copy / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text() + "# a comment\n")
    assert "edited_config" not in evaluate_run(finished_copy)
    saved.write_text(saved.read_text().replace("lr: 0.003", "lr: 0.1"))
    with pytest.raises(RunDirError, match=r"it was edited since the run; it differs at optim\.optimizer\.lr"):
        evaluate_run(finished_copy)


@pytest.fixture
def small_mount(tmp_path):
    """Mount a 1 MiB tmpfs (root only) and yield a function that remounts it read-only."""
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_write_error_blames_the_disk_or_the_permissions_only_when_the_errno_says_so(small_mount):
    """Real errors: ENOSPC from a full tmpfs, EROFS from the same tmpfs remounted read-only."""
    import subprocess

    from finetune.errors import TrainingError
    from finetune.state import write_atomic

    with pytest.raises(TrainingError) as full:
        write_atomic(small_mount / "big.bin", lambda tmp: tmp.write_bytes(b"\0" * (2 * 2**20)))
    assert "No space left on device" in full.value.problem and "MiB free there" in full.value.problem
    assert full.value.fix.startswith("free disk space")
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    with pytest.raises(TrainingError) as read_only:
        write_atomic(small_mount / "summary.json", lambda tmp: tmp.write_text("{}"))
    assert "Read-only file system" in read_only.value.problem and "MiB free" not in read_only.value.problem
    assert "writable" in read_only.value.fix and "disk space" not in read_only.value.fix
    assert list(small_mount.iterdir()) == []  # no temp file left behind either
