"""finetune-eval: a finished run's config rebuilt with Hydra's compose API from its .hydra/ (overrides,
the config dirs it used), its weights loaded strictly, evaluated with the run's task.

Two real runs (`python -m finetune`, module-scoped) are evaluated in-process; each test works on its
own copy of a run directory, so editing one never touches another test's run."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from command_line import command_env, finetune_side_by_side

from finetune.commands.eval import evaluate_run, main
from finetune.compose import merge_overrides, read_recorded_run
from finetune.errors import CheckpointError, ConfigError, RunDirError

TESTS_CONF = Path(__file__).parent / "conf"
COMMON = ["trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> Path:
    """A user's --config-dir: the test configs plus a smaller classification data set."""
    conf = tmp_path_factory.mktemp("user") / "conf"
    shutil.copytree(TESTS_CONF, conf)
    (conf / "data" / "tiny_small.yaml").write_text(textwrap.dedent("""
        train: {_target_: tiny.make_dataset, n: 16, seed: 3}
        val: {_target_: tiny.make_dataset, n: 20, seed: 4}
        batch_size: 16
        """))
    return conf


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpts, user_conf, finetune_cache) -> dict[str, Path]:
    """A classification run made with --config-dir, a regression run and a run with trainer.ema,
    trained side by side."""
    args = {
        "classification": ["--config-dir", str(user_conf), "model=tiny", "data=tiny", "checkpoint=tiny",
                           f"checkpoint.path={tiny_ckpts.safetensors}", "data.batch_size=12"],
        "regression": ["--config-dir", str(TESTS_CONF), "task=regression", "model=mlp_regression", "data=regression",
                       "checkpoint=none"],
        "ema": ["--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
                f"checkpoint.path={tiny_ckpts.safetensors}", "trainer.ema=0.5"],
    }
    runs = finetune_side_by_side(tmp_path_factory.mktemp("runs"), {name: [*extra, *COMMON] for name, extra in args.items()},
                                 command_env(finetune_cache))
    assert all(read_json(run_dir / "summary.json")["status"] == "completed" for run_dir in runs.values())
    return runs


@pytest.fixture
def run_copy(runs, tmp_path):
    def copy(name: str = "classification") -> Path:
        target = tmp_path / name
        shutil.copytree(runs[name], target)
        return target

    return copy


def batch_sizes(monkeypatch) -> list[int]:
    """The batch size of each loader finetune.loop.evaluate is given from now on."""
    import finetune.loop

    seen, original = [], finetune.loop.evaluate

    def spy(model, loader, *args, **kwargs):
        seen.append(loader.batch_size)
        return original(model, loader, *args, **kwargs)

    monkeypatch.setattr(finetune.loop, "evaluate", spy)
    return seen


def rewrite_config_dir(run_dir: Path, old: Path, new: Path) -> None:
    """What moving a config dir looks like to a run dir: hydra.yaml names a dir that is now elsewhere."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    hydra_yaml.write_text(hydra_yaml.read_text().replace(str(old), str(new)))


# ---- a finished run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_of_a_finished_run_gives_its_last_validation(run_copy, user_conf, capsys):
    run_dir = run_copy()
    assert read_recorded_run(run_dir).search_path == [f"file://{user_conf}"]  # the --config-dir, from hydra.yaml
    assert main([str(run_dir)]) == 0  # no --config-dir: found from hydra.yaml
    out = capsys.readouterr().out
    assert "val/acc" in out and f"wrote {run_dir / 'eval.json'}" in out
    evaluated = read_json(run_dir / "eval.json")
    final = read_json(run_dir / "summary.json")["final"]  # trainer.save=final: the weights of that evaluation
    assert set(evaluated["metrics"]) == {"val/loss", "val/acc"} == set(final)
    assert evaluated["metrics"] == pytest.approx(final, rel=1e-6)
    assert evaluated["samples"] == 48


@pytest.mark.slow
def test_eval_of_a_regression_run_logs_the_tasks_metrics(run_copy):
    run_dir = run_copy("regression")
    result = evaluate_run(run_dir)
    final = read_json(run_dir / "summary.json")["final"]
    assert set(result["metrics"]) == {"val/loss", "val/mae", "val/mse"}
    assert read_json(run_dir / "eval.json")["metrics"] == pytest.approx(final, rel=1e-6)


@pytest.mark.slow
def test_eval_of_the_ema_weights_gives_the_runs_last_ema_validation(run_copy, capsys):
    run_dir = run_copy("ema")
    final = read_json(run_dir / "summary.json")["final"]
    assert main([str(run_dir), "--weights", "model_ema.safetensors"]) == 0
    evaluated = read_json(run_dir / "eval.json")
    assert evaluated["weights"] == str(run_dir / "model_ema.safetensors")
    assert evaluated["metrics"] == pytest.approx({k.replace("val/ema/", "val/"): v for k, v in final.items()
                                                  if k.startswith("val/ema/")}, rel=1e-6)
    assert evaluated["metrics"] != pytest.approx({k: final[k] for k in evaluated["metrics"]}, rel=1e-6)  # not the raw weights
    plain = run_copy()
    with pytest.raises(RunDirError, match=r"has no model_ema.safetensors \(the run had no trainer.ema\)"):
        evaluate_run(plain, weights="model_ema.safetensors")
    with pytest.raises(RunDirError, match="not one of the weights a run writes"):
        evaluate_run(plain, weights="../elsewhere.safetensors")


# ---- the config dirs and the overrides -----------------------------------------------------------


@pytest.mark.slow
def test_a_moved_config_dir_is_named_and_can_be_passed(run_copy, user_conf, tmp_path):
    run_dir = run_copy()
    gone = tmp_path / "moved-away"
    rewrite_config_dir(run_dir, user_conf, gone)
    with pytest.raises(ConfigError) as info:
        evaluate_run(run_dir)
    assert str(gone) in info.value.problem and "--config-dir" in info.value.fix
    assert not (run_dir / "eval.json").exists()
    result = evaluate_run(run_dir, config_dirs=[str(user_conf)])
    assert set(result["metrics"]) == {"val/loss", "val/acc"} and result["config_dirs"] == [str(user_conf)]


@pytest.mark.slow
def test_eval_overrides_come_after_the_runs_own(run_copy, monkeypatch):
    run_dir = run_copy()
    sizes = batch_sizes(monkeypatch)
    plain = evaluate_run(run_dir)
    smaller = evaluate_run(run_dir, ["data.batch_size=7"])
    assert sizes == [12, 7]  # the run's data.batch_size=12, then the eval's
    assert smaller["metrics"] == pytest.approx(plain["metrics"], rel=1e-6)
    assert read_json(run_dir / "eval.json")["overrides"] == ["data.batch_size=7"]


@pytest.mark.slow
def test_a_group_override_replaces_the_runs_choice(run_copy, monkeypatch):
    run_dir = run_copy()
    sizes = batch_sizes(monkeypatch)
    other = evaluate_run(run_dir, ["data=tiny_small"])  # from the run's --config-dir
    assert other["samples"] == 20 and sizes == [16]  # tiny_small's batch size: the run's data.* went with data=tiny
    evaluate_run(run_dir, ["data=tiny_small", "data.batch_size=5"])
    assert sizes == [16, 5]


def test_merge_overrides_later_wins():
    run = ["model=tiny", "data=tiny", "data.batch_size=12", "+trainer.extra=1", "seed=3"]
    assert merge_overrides(run, ["data.batch_size=7", "seed=4"]) == \
        ["model=tiny", "data=tiny", "+trainer.extra=1", "data.batch_size=7", "seed=4"]
    assert merge_overrides(run, ["data=other"]) == ["model=tiny", "+trainer.extra=1", "seed=3", "data=other"]
    assert merge_overrides(run, ["trainer.extra=2"])[-1] == "++trainer.extra=2"  # the key exists only as the run added it
    with pytest.raises(ConfigError, match="invalid override"):
        merge_overrides(run, ["data.batch_size=[1,"])


@pytest.mark.slow
def test_weights_that_do_not_fit_the_rebuilt_model_are_refused(run_copy):
    run_dir = run_copy()
    with pytest.raises(CheckpointError, match="does not fit the model rebuilt"):
        evaluate_run(run_dir, ["model.add=[]"])
    assert not (run_dir / "eval.json").exists()


# ---- run directories that must not be evaluated --------------------------------------------------


@pytest.mark.slow
def test_an_edited_saved_config_is_refused(run_copy):
    run_dir = run_copy()
    saved = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    config["model"]["base"]["_target_"] = "os.system"
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(RunDirError) as info:
        evaluate_run(run_dir)
    assert "config.yaml does not match the config the run trained with" in info.value.problem
    assert "model.base._target_" in info.value.problem
    assert not (run_dir / "eval.json").exists()


@pytest.mark.slow
def test_edited_overrides_are_refused(run_copy):
    run_dir = run_copy()
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- data.val.n=40\n")
    with pytest.raises(RunDirError) as info:
        evaluate_run(run_dir)
    assert "gives a config other than the one the run trained with" in info.value.problem
    assert "data.val.n" in info.value.problem
    assert not (run_dir / "eval.json").exists()


@pytest.mark.slow
def test_a_changed_config_file_of_the_run_is_refused(run_copy, user_conf, tmp_path):
    run_dir = run_copy()
    changed = tmp_path / "conf"
    shutil.copytree(user_conf, changed)
    tiny = changed / "data" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("n: 48", "n: 40"))
    rewrite_config_dir(run_dir, user_conf, changed)
    with pytest.raises(RunDirError, match=r"differs at data\.val\.n"):
        evaluate_run(run_dir)


@pytest.mark.slow
def test_missing_weights_or_not_a_run_dir_is_one_message(run_copy, tmp_path, capsys):
    run_dir = run_copy()
    (run_dir / "model.safetensors").unlink()
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "has no model.safetensors" in err and "(summary.json status: completed)" in err and "  fix: " in err
    assert err.count("finetune: error:") == 1 and "Traceback" not in err
    assert not (run_dir / "eval.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "it is not a finetune run directory" in err and err.count("finetune: error:") == 1
    assert list(empty.iterdir()) == []
