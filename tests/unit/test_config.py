"""Config schema: every YAML composes and validates; bad values fail with field, value and fix."""

from pathlib import Path

import pytest

from asyncopd.config import ConfigError, JobConfig, from_dict
from asyncopd.launch import CONFIG_DIR, compose_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_composes_and_validates(path: Path) -> None:
    cfg = compose_config(["--config-name", path.stem])
    assert isinstance(cfg, JobConfig)
    assert cfg.cluster.world_size >= 3


def test_default_yaml_lists_every_schema_field() -> None:
    import yaml

    data = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    data["async_"] = data.pop("async")
    schema = JobConfig().to_dict()
    schema["async_"] = schema.pop("async")
    for group, fields in schema.items():
        assert set(data[group]) == set(fields), f"configs/default.yaml group {group} differs from the schema"


def test_overrides_reach_the_typed_config() -> None:
    cfg = compose_config(["async.max_staleness=0", "cluster.learners=2", "learner.lr=3e-4",
                          "model.student.path=/x/student"])
    assert cfg.async_.max_staleness == 0
    assert cfg.cluster.learners == 2 and cfg.cluster.world_size == 4
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.model.student.path == "/x/student"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["async.max_staleness=-1"], "async.max_staleness=-1"),
        (["learner.lr=-0.1"], "learner.lr=-0.1"),
        (["learner.lrr=0.1"], "lrr"),
        (["learner.num_steps=abc"], "learner.num_steps"),
        (["learner.batch_size=6", "actor.samples_per_prompt=4"], "learner.batch_size=6"),
        (["cluster.actors=3", "learner.batch_size=8"], "3 actors"),
        (["buffer.capacity=4"], "buffer.capacity=4"),
        (["actor.max_new_tokens=100", "actor.max_model_len=64"], "actor.max_new_tokens=100"),
        (["task.train_path=/no/such/file.jsonl"], "task.train_path"),
        # GRPO needs groups.
        (["loss.advantage=grpo"], "loss.advantage='grpo': normalises rewards within groups of "
                                  "actor.samples_per_prompt=1"),
        # Reward-based objectives need a reward.
        (["loss.advantage=grpo", "actor.samples_per_prompt=4", "task.reward=none"], "task.reward='none'"),
        (["loss.advantage=reinforce_pp", "task.reward=none"], "loss.advantage='reinforce_pp'"),
        (["loss.advantage=reinforce_pp", "loss.kl_loss=k3", "task.reward=none"], "KDRL without a reward"),
        # The top-k loss needs the teacher's top-k.
        (["loss.kl_loss=topk"], "loss.kl_loss='topk': the top-k reverse KL needs the teacher's top-k "
                                "log-probs but teacher.top_k=0"),
        # Decoupled PPO needs its clip.
        (["loss.importance_correction=decoupled_ppo", "loss.ppo_clip_low=null"], "loss.ppo_clip_low=None"),
        (["loss.importance_correction=decoupled_ppo", "loss.ppo_clip_high=null"], "loss.ppo_clip_high=None"),
        # A loss that is identically zero.
        (["loss.pg_coef=0"], "nothing to train"),
        (["loss.pg_coef=0", "loss.kl_loss=k2", "loss.kl_loss_coef=0"], "nothing to train"),
        # Ranges.
        (["loss.discount=1.5"], "loss.discount=1.5"),
        (["loss.tis_cap=0"], "loss.tis_cap=0"),
        (["loss.kl_clamp=0"], "loss.kl_clamp=0"),
        (["loss.is_mask_low=2.0", "loss.is_mask_high=1.5"], "loss.is_mask_low=2.0"),
        (["loss.ppo_clip_low=1.0"], "loss.ppo_clip_low=1.0"),
        (["loss.entropy_coef=-0.1"], "loss.entropy_coef=-0.1"),
        (["teacher.top_k=-1"], "teacher.top_k=-1"),
        (["loss.aggregation=seq-mean"], "aggregation"),
        (["loss.importance_correction=ppo"], "importance_correction"),
    ],
)
def test_impossible_configs_name_field_value_and_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert expected in str(info.value)
    assert "Fix" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.advantage=grpo", "actor.samples_per_prompt=8", "loss.opd_penalty_coef=0.5"],  # GRPO + OPD penalty
        ["loss.advantage=grpo", "actor.samples_per_prompt=8", "loss.kl_loss=k3"],  # KDRL
        ["loss.pg_coef=0", "loss.kl_loss=topk", "teacher.top_k=8", "task.reward=none"],  # pure top-k KD
        ["loss.importance_correction=decoupled_ppo", "loss.discount=0.9", "loss.aggregation=seq-mean-token-sum"],
        ["loss.importance_correction=mask", "loss.ppo_clip_low=null", "loss.ppo_clip_high=null"],
        ["loss.pg_coef=0", "loss.entropy_coef=0.01"],
        ["task.reward=none"],  # OPD needs no reward
    ],
)
def test_valid_objectives_compose(overrides: list[str]) -> None:
    import yaml

    cfg = compose_config(overrides)
    for override in overrides:
        key, raw = override.split("=")
        group, name = key.split(".")
        assert getattr(getattr(cfg, group), name) == yaml.safe_load(raw), override


def test_world_size_mismatch_is_explained() -> None:
    cfg = from_dict({"cluster": {"learners": 2, "actors": 1, "teachers": 1}})
    with pytest.raises(ConfigError, match="nproc-per-node=4"):
        cfg.cluster.check_world_size(3)
    assert cfg.cluster.role_of(0) == ("learner", 0)
    assert cfg.cluster.role_of(2) == ("actor", 0)
    assert cfg.cluster.role_of(3) == ("teacher", 0)


def test_unknown_config_name_lists_choices() -> None:
    with pytest.raises(ConfigError, match="default"):
        compose_config(["--config-name", "nope"])
