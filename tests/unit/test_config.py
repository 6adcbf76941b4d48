"""Config schema: every YAML composes and validates; bad values fail with field, value and fix."""

import os
from pathlib import Path

import pytest

from asyncopd.config import ConfigError, JobConfig, from_dict
from asyncopd.launch import CONFIG_DIR, compose_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_composes_and_validates(path: Path) -> None:
    cfg = compose_config(["--config-name", path.stem])
    assert isinstance(cfg, JobConfig)
    # Teacher ranks exactly when the teacher does not run inside the learner.
    assert cfg.cluster.learners >= 1 and cfg.cluster.actors >= 1
    assert (cfg.cluster.teachers >= 1) == (cfg.teacher.backend != "colocated")


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
        (["loss.kl_loss=topk", "teacher.top_k=0"], "loss.kl_loss='topk': the top-k reverse KL needs the "
                                                   "teacher's top-k log-probs but teacher.top_k=0"),
        (["loss.kl_loss=full"], "loss.kl_loss='full': the exact reverse KL over the full vocabulary needs"),
        (["loss.kl_loss=topk", "teacher.backend=colocated", "cluster.teachers=0"],
         "loss.kl_loss='topk': teacher.backend=colocated computes the exact KL"),
        (["teacher.top_k=16", "teacher.backend=colocated", "cluster.teachers=0"], "teacher.top_k=16"),
        # Decoupled PPO needs its clip.
        (["loss.importance_correction=decoupled_ppo", "loss.ppo_clip_low=null"], "loss.ppo_clip_low=None"),
        (["loss.importance_correction=decoupled_ppo", "loss.ppo_clip_high=null"], "loss.ppo_clip_high=None"),
        # A loss that is identically zero.
        (["loss.pg_coef=0", "loss.kl_loss=none"], "nothing to train"),
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


# ---- cluster.auth: which security a job gets, and the job key ----------------------------------

@pytest.mark.parametrize(("host", "auth", "expected"), [
    ("127.0.0.1", "auto", "curve"), ("localhost", "auto", "curve"), ("::1", "auto", "curve"),
    ("10.0.0.2", "auto", "curve"), ("node7", "auto", "curve"), ("0.0.0.0", "auto", "curve"),
    ("127.0.0.1", "curve", "curve"), ("10.0.0.2", "none", "none"), ("127.0.0.1", "none", "none"),
])
def test_auth_auto_is_curve_on_loopback_too(host: str, auth: str, expected: str) -> None:
    assert from_dict({"cluster": {"host": host, "auth": auth}}).cluster.resolved_auth == expected


def test_a_multi_node_job_on_loopback_is_refused() -> None:
    cluster = from_dict({"cluster": {"host": "127.0.0.1"}}).cluster
    cluster.check_num_nodes(1)
    with pytest.raises(ConfigError, match="cluster.host='127.0.0.1'.*2 nodes.*Fix"):
        cluster.check_num_nodes(2)


def curve_cluster(**fields):
    return from_dict({"cluster": {"host": "10.0.0.2", **fields}}).cluster


def test_job_key_sources() -> None:
    from asyncopd.transport.security import JobKey, job_key_for

    assert job_key_for(from_dict({"cluster": {"auth": "none"}}).cluster, inherited_secret=None, num_nodes=1,
                       can_generate=False) is None
    made = job_key_for(curve_cluster(), inherited_secret=None, num_nodes=1, can_generate=True)
    assert made is not None and JobKey.from_secret(made.secret).public == made.public
    inherited = job_key_for(curve_cluster(), inherited_secret=made.secret.decode(), num_nodes=2, can_generate=False)
    assert inherited.public == made.public and made.secret.decode() not in repr(inherited)


@pytest.mark.parametrize(("num_nodes", "expected"), [
    (2, r"cluster.auth_key_file=None: the job spans 2 nodes.*Fix: run `python -m asyncopd.transport.security keygen"),
    (1, r"cluster.auth_key_file=None:.*torchrun was started directly.*Fix: start with `python -m asyncopd.launch`"),
])
def test_curve_without_a_key_file_names_the_fix(num_nodes: int, expected: str) -> None:
    from asyncopd.transport.security import job_key_for

    with pytest.raises(ConfigError, match=expected):
        job_key_for(curve_cluster(), inherited_secret=None, num_nodes=num_nodes, can_generate=False)


def test_keygen_writes_a_private_key_file_that_loads(tmp_path: Path, capsys) -> None:
    from asyncopd.transport.security import JobKey, job_key_for, main

    assert main(["keygen", str(tmp_path / "keys")]) == 0
    secret_file = tmp_path / "keys" / "asyncopd_job.key_secret"
    assert f"cluster.auth_key_file={secret_file}" in capsys.readouterr().out
    assert secret_file.stat().st_mode & 0o777 == 0o600
    key = job_key_for(curve_cluster(auth_key_file=str(secret_file)), inherited_secret=None, num_nodes=4,
                      can_generate=False)
    assert key == JobKey.load(secret_file)
    assert main(["keygen", str(tmp_path / "keys")]) == 1  # never overwrites a key a job may use
    assert JobKey.load(secret_file) == key


@pytest.mark.parametrize(("damage", "expected"), [
    ("missing", "cannot read it"),
    ("not a certificate", "no CURVE public-key"),
    ("public half", "holds only a public key. Fix: point it at the \\*.key_secret file"),
    ("another key's secret", "garbled"),
    ("truncated secret", "garbled"),
    ("non-z85 secret", "garbled"),
])
def test_an_unusable_key_file_names_the_field_and_the_fix(tmp_path: Path, damage: str, expected: str) -> None:
    from asyncopd.transport.security import JobKey, job_key_for, keygen

    secret_file = keygen(tmp_path)
    path = {"missing": tmp_path / "nope.key_secret", "public half": secret_file.with_suffix(".key")}.get(
        damage, secret_file)
    if damage == "not a certificate":
        path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    elif damage.endswith("secret"):
        secret = JobKey.load(path).secret.decode()
        replacement = {"another key's secret": JobKey.generate().secret.decode(), "truncated secret": secret[:-5],
                       "non-z85 secret": "#" * 40}[damage]
        path.write_text(path.read_text().replace(secret, replacement))
    with pytest.raises(ConfigError, match=expected) as info:
        job_key_for(curve_cluster(auth_key_file=str(path)), inherited_secret=None, num_nodes=2, can_generate=False)
    assert f"cluster.auth_key_file='{path}'" in str(info.value) and "Fix" in str(info.value)


def test_libzmq_without_curve_fails_clearly(monkeypatch) -> None:
    import zmq

    from asyncopd.transport.security import job_key_for

    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(ConfigError, match="built without CURVE.*Fix"):
        job_key_for(curve_cluster(), inherited_secret=None, num_nodes=1, can_generate=True)
    assert job_key_for(from_dict({"cluster": {"auth": "none"}}).cluster, inherited_secret=None, num_nodes=1,
                       can_generate=True) is None


def test_the_launcher_hands_one_job_key_to_its_ranks(monkeypatch) -> None:
    from asyncopd.launch import install_security, world_environment
    from asyncopd.transport.security import JOB_SECRET_ENV, JobKey
    from asyncopd.transport.sockets import configure_security

    cfg = from_dict({"cluster": {"auth": "curve"}})
    env = world_environment(cfg)
    monkeypatch.setenv(JOB_SECRET_ENV, env[JOB_SECRET_ENV])
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    try:
        security = install_security(cfg)
        assert security.key == JobKey.from_secret(env[JOB_SECRET_ENV].encode())
        assert JOB_SECRET_ENV not in os.environ  # not inherited by the engine's subprocesses
        monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # a rank of a multi-node job, no key file
        with pytest.raises(ConfigError, match="spans 2 nodes"):
            install_security(from_dict({"cluster": {"host": "10.0.0.2"}}))
    finally:
        configure_security(None)
    assert JOB_SECRET_ENV not in world_environment(from_dict({"cluster": {"auth": "none"}}))
    assert JOB_SECRET_ENV in world_environment(from_dict({}))  # the default is authenticated


def test_ranks_of_a_directly_started_world_share_one_private_key_file(tmp_path: Path) -> None:
    import threading

    from asyncopd.transport.security import SHARED_KEY_NAME, job_key_for

    cluster = from_dict({}).cluster
    keys: list = []

    def rank() -> None:
        keys.append(job_key_for(cluster, inherited_secret=None, num_nodes=1, can_generate=False,
                                shared_key_dir=tmp_path / "run"))

    ranks = [threading.Thread(target=rank) for _ in range(6)]  # racing at start-up
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert len(keys) == 6 and len({k.public for k in keys}) == 1
    assert (tmp_path / "run" / SHARED_KEY_NAME).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [SHARED_KEY_NAME]  # no scratch left
    again = job_key_for(cluster, inherited_secret=None, num_nodes=1, can_generate=False,
                        shared_key_dir=tmp_path / "run")
    assert again == keys[0]  # a torchrun restart finds the same key
    with pytest.raises(ConfigError, match="spans 2 nodes"):  # never for a multi-node job
        job_key_for(cluster, inherited_secret=None, num_nodes=2, can_generate=False, shared_key_dir=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "kl_loss", "pg_coef", "top_k"),
    [
        ([], "topk", 0.0, 16),  # teacher ranks: only a top-k travels
        (["teacher.backend=colocated", "cluster.teachers=0"], "full", 0.0, 0),  # teacher in the learner
        (["--config-name", "colocated"], "full", 0.0, 0),
        (["teacher.backend=vllm_http", "teacher.url=http://127.0.0.1:8000/v1"], "topk", 0.0, 16),
        (["teacher.top_k=8"], "topk", 0.0, 8),  # an explicit width is kept
        (["loss.kl_loss=none"], "none", 1.0, 0),  # the seeds' OPD advantage, no top-k cost on the actors
        (["loss.kl_loss=none", "loss.pg_coef=1"], "none", 1.0, 0),
        (["loss.kl_loss=k3"], "k3", 0.0, 0),
        (["teacher.top_k=0"], "none", 1.0, 0),  # no top-k on the wire: the OPD advantage is what is left
        (["loss.kl_loss_coef=0"], "topk", 1.0, 16),  # KL weighted 0: the OPD advantage trains
        # A reward advantage keeps its policy gradient beside the KL loss (KDRL).
        (["loss.advantage=grpo", "actor.samples_per_prompt=4"], "topk", 1.0, 16),
        (["loss.advantage=grpo", "actor.samples_per_prompt=4", "teacher.backend=colocated", "cluster.teachers=0"],
         "full", 1.0, 0),
        (["loss.advantage=grpo", "actor.samples_per_prompt=4", "loss.kl_loss=none"], "none", 1.0, 0),  # plain GRPO
        (["loss.pg_coef=0.5"], "topk", 0.5, 16),
    ],
)
def test_auto_objective_resolves_once_in_the_config(overrides: list[str], kl_loss: str, pg_coef: float,
                                                    top_k: int) -> None:
    cfg = compose_config(overrides)
    assert (cfg.loss.kl_loss, cfg.loss.pg_coef, cfg.teacher.top_k) == (kl_loss, pg_coef, top_k)
    # Resolved values survive the round trip through config.yaml (each rank parses it again).
    again = from_dict(cfg.to_dict())
    assert (again.loss.kl_loss, again.loss.pg_coef, again.teacher.top_k) == (kl_loss, pg_coef, top_k)
    assert f"loss.kl_loss={kl_loss} " in cfg.objective and f"teacher.top_k={top_k}" in cfg.objective


def test_objective_names_the_resolved_loss() -> None:
    assert compose_config([]).objective == ("1 x reverse KL over teacher+student top-16 plus a tail bucket "
                                            "(loss.kl_loss=topk loss.pg_coef=0 teacher.top_k=16)")
    assert compose_config(["--config-name", "colocated"]).objective.startswith(
        "1 x exact reverse KL over the full vocabulary (loss.kl_loss=full")
    assert compose_config(["loss.kl_loss=none"]).objective == (
        "1 x OPD advantage (loss.kl_loss=none loss.pg_coef=1 teacher.top_k=0)")
