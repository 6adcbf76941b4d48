"""configs/staleness.yaml pins the setting of the recorded staleness study
(bench/results/staleness_study/): a change of the defaults must not move it."""

from __future__ import annotations

from asyncopd.launch import compose_config


def test_the_study_setting_does_not_follow_the_defaults() -> None:
    cfg = compose_config(["--config-name", "staleness"])
    assert (cfg.learner.lr, cfg.learner.batch_size, cfg.learner.num_steps) == (1e-4, 64, 150)
    assert (cfg.learner.mini_batches, cfg.learner.ppo_epochs) == (1, 1)
    assert cfg.async_.schedule == "fixed_lag"
    assert cfg.teacher.top_k == 0
    loss = cfg.loss
    assert (loss.advantage, loss.kl_loss, loss.pg_coef) == ("opd", "none", 1.0)
    assert (loss.opd_coef, loss.opd_penalty_coef) == (1.0, 0.0)
    assert (loss.importance_correction, loss.tis_cap, loss.is_mask_low, loss.is_mask_high) == ("tis", 2.0, 0.5, 2.0)
    assert (loss.entropy_coef, loss.aggregation, loss.discount) == (0.0, "token-mean", 0.0)
