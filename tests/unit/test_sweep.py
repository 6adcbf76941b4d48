"""Sweeps (`python -m asyncopd.launch -m key=a,b`): expansion with hydra's grammar,
one validated job per combination with its own run directory, the comparison, and
clear errors for sweeps that cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncopd.config import ConfigError
from asyncopd.launch import CONFIG_DIR, compose_config
from asyncopd.sweep import expand, plan, run_sweep

OPTIONS = ["--config-name=tiny", f"--config-dir={CONFIG_DIR}"]


def test_sweeps_expand_to_the_cartesian_product_in_order() -> None:
    combos, swept = expand(["async.max_staleness=0,1", "learner.lr=1e-4", "learner.seed=range(2)"])
    assert swept == ["async.max_staleness", "learner.seed"]
    assert combos == [["async.max_staleness=0", "learner.lr=0.0001", "learner.seed=0"],
                      ["async.max_staleness=0", "learner.lr=0.0001", "learner.seed=1"],
                      ["async.max_staleness=1", "learner.lr=0.0001", "learner.seed=0"],
                      ["async.max_staleness=1", "learner.lr=0.0001", "learner.seed=1"]]


def test_each_job_gets_its_own_validated_config_and_run_directory(tmp_path) -> None:
    base, jobs = plan(OPTIONS, ["async.max_staleness=0,2", "loss.advantage=opd,grpo", "actor.samples_per_prompt=2",
                                f"run.dir={tmp_path}"], compose_config)
    assert base == tmp_path and len(jobs) == 4
    tag, argv, cfg = jobs[3]
    assert tag == "async.max_staleness=2,loss.advantage=grpo"
    assert cfg.run.run_dir == tmp_path / tag and cfg.run.name == f"tiny-{tag}"
    assert cfg.async_.max_staleness == 2 and cfg.loss.advantage == "grpo"
    assert compose_config(argv) == cfg  # what each job's ranks compose again


@pytest.mark.parametrize(("overrides", "expected"), [
    (["async.max_staleness=0,-1"], r"sweep job async.max_staleness=-1: .*async.max_staleness=-1: must be >= 0. Fix"),
    (["run.dir=a,b"], r"run.\* settings name where a sweep writes and cannot be swept"),
    (["learner.lr=interval(0.1,0.2)"], r"an interval sweep has no finite list of values"),
    (["learner.lr=1e-4"], r"-m/--multirun without a swept value"),
    (["learner.lr=[1,"], r"Fix: write sweeps as key=a,b,c"),
    (["run.seed=0,1", "run.seeds=2"], r"run.seeds=2 with a swept run.seed: two ways of giving replicates"),
])
def test_a_sweep_that_cannot_run_fails_before_any_job(overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        plan(OPTIONS, overrides, compose_config)


def test_a_failed_job_is_reported_and_the_sweep_goes_on(tmp_path) -> None:
    started = []

    def spawn(cfg, argv) -> int:
        started.append(cfg.async_.max_staleness)
        if cfg.async_.max_staleness == 1:
            return 1
        cfg.run.run_dir.mkdir(parents=True)
        summary = {"wall_s": 12.0, "train_wall_s": 9.0, "policy_version": 3, "start_policy_version": 0,
                   "eval/accuracy_before": 0.5, "eval/accuracy_after": 0.75, "eval/rkl_before": 1.5,
                   "eval/rkl_after": 0.5, "buffer/staleness_max": cfg.async_.max_staleness,
                   "async/max_staleness": cfg.async_.max_staleness, "samples_dropped_stale": 0}
        (cfg.run.run_dir / "summary.json").write_text(json.dumps(summary))
        return 0

    code = run_sweep(OPTIONS, ["async.max_staleness=0,1,2", f"run.dir={tmp_path}"], compose=compose_config,
                     spawn=spawn)
    assert code == 1 and started == [0, 1, 2]
    jobs = json.loads((tmp_path / "sweep.json").read_text())
    assert [(j["job"], j["returncode"], j["summary"] is not None) for j in jobs] == [
        ("async.max_staleness=0", 0, True), ("async.max_staleness=1", 1, False), ("async.max_staleness=2", 0, True)]
    assert Path(jobs[2]["run_dir"]) == tmp_path / "async.max_staleness=2"


def test_replicates_run_each_combination_once_per_seed_in_its_own_directory(tmp_path) -> None:
    base, jobs = plan(OPTIONS, ["async.max_staleness=0,2", "run.seeds=2", f"run.dir={tmp_path}"], compose_config)
    assert [(tag, cfg.run.seed, cfg.run.run_dir) for tag, _, cfg in jobs] == [
        ("async.max_staleness=0", 0, tmp_path / "async.max_staleness=0" / "seed=0"),
        ("async.max_staleness=0", 1, tmp_path / "async.max_staleness=0" / "seed=1"),
        ("async.max_staleness=2", 0, tmp_path / "async.max_staleness=2" / "seed=0"),
        ("async.max_staleness=2", 1, tmp_path / "async.max_staleness=2" / "seed=1")]
    assert all(cfg.run.seeds == 1 for _, _, cfg in jobs)  # a job never starts replicates of its own
    assert compose_config(jobs[1][1]) == jobs[1][2]
    # The swept form gives the same jobs.
    _, swept = plan(OPTIONS, ["async.max_staleness=0,2", "run.seed=range(2)", f"run.dir={tmp_path}"], compose_config)
    assert [(t, c.run.seed, c.run.run_dir) for t, _, c in swept] == [(t, c.run.seed, c.run.run_dir) for t, _, c in jobs]


def test_replicates_alone_are_a_sweep_of_one_combination(tmp_path) -> None:
    _, jobs = plan(OPTIONS, ["run.seeds=3", "run.seed=4", f"run.dir={tmp_path}"], compose_config)
    assert [(cfg.run.seed, cfg.run.run_dir) for _, _, cfg in jobs] == [
        (4, tmp_path / "seed=4"), (5, tmp_path / "seed=5"), (6, tmp_path / "seed=6")]
