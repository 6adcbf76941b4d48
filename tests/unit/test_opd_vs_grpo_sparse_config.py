"""configs/opd_vs_grpo_sparse.yaml pins the setting of the recorded sparse-reward study
(bench/results/opd_vs_grpo_sparse/): a change of the defaults must not move it."""

from __future__ import annotations

from asyncopd.launch import compose_config


def test_the_sparse_study_setting() -> None:
    cfg = compose_config(["--config-name", "opd_vs_grpo_sparse"])
    assert cfg.task.name == "addition" and cfg.task.student_accuracy == 0.05
    assert (cfg.learner.lr, cfg.learner.batch_size, cfg.learner.num_steps) == (6e-4, 256, 200)
    assert (cfg.eval.every_steps, cfg.eval.rkl_samples) == (10, 4)
    # The OPD arm's objective is the job default (bench/opd_vs_grpo.py --opd-kl-loss auto).
    assert (cfg.loss.advantage, cfg.loss.kl_loss, cfg.teacher.top_k) == ("opd", "topk", 16)
