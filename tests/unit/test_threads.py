"""Thread budgets per rank (asyncopd/threads.py): numbers pass through, ``auto`` takes the
node's cores for its learners, and passive OpenMP waiting only where threads oversubscribe."""

import pytest

from asyncopd.config import ClusterConfig, ConfigError, from_dict
from asyncopd.threads import node_threads, rank_threads, thread_environment


def _colocated(**kwargs) -> ClusterConfig:
    return ClusterConfig(teachers=0, **kwargs)


def test_numbers_pass_through():
    cluster = ClusterConfig(learner_threads=3, actor_threads=2, teacher_threads=4)
    layout = dict(node=0, procs_per_node=3, cores=2)
    assert [rank_threads(cluster, r, **layout) for r in ("learner", "actor", "teacher")] == [3, 2, 4]
    assert node_threads(cluster, **layout) == 9


def test_auto_learner_takes_the_node_cores():
    layout = dict(node=0, procs_per_node=2, cores=2)
    cluster = _colocated(learner_threads="auto")
    assert rank_threads(cluster, "learner", **layout) == 2
    assert rank_threads(cluster, "actor", **layout) == 1
    assert node_threads(cluster, **layout) == 3
    assert rank_threads(cluster, "learner", node=0, procs_per_node=2, cores=16) == 16


def test_auto_splits_cores_among_the_learners_of_a_node():
    cluster = ClusterConfig(learners=2, actors=2, teachers=0, learner_threads="auto")
    # one node with all four ranks: two learners share 8 cores
    assert rank_threads(cluster, "learner", node=0, procs_per_node=4, cores=8) == 4
    # two nodes of two ranks: node 0 holds both learners, node 1 none (its count is irrelevant)
    assert rank_threads(cluster, "learner", node=0, procs_per_node=2, cores=8) == 4
    # more learners than cores: at least one thread each
    many = ClusterConfig(learners=4, actors=1, teachers=0, learner_threads="auto")
    assert rank_threads(many, "learner", node=0, procs_per_node=5, cores=2) == 1


def test_passive_waiting_only_when_a_wide_rank_oversubscribes():
    layout = dict(node=0, procs_per_node=2, cores=2)
    assert thread_environment(_colocated(learner_threads=2), environ={}, **layout) == {"OMP_WAIT_POLICY": "PASSIVE"}
    # 1 + 1 threads on 2 cores: nothing to change
    assert thread_environment(_colocated(), environ={}, **layout) == {}
    # three one-thread ranks on 2 cores: a one-thread team never spins at a barrier
    assert thread_environment(ClusterConfig(), environ={}, node=0, procs_per_node=3, cores=2) == {}
    # 2 + 1 threads on 4 cores: not oversubscribed
    assert thread_environment(_colocated(learner_threads=2), environ={}, node=0, procs_per_node=2, cores=4) == {}
    # the user's own setting wins
    assert thread_environment(_colocated(learner_threads=2), environ={"OMP_WAIT_POLICY": "ACTIVE"}, **layout) == {}


def test_config_accepts_auto_and_rejects_bad_values():
    assert from_dict({"cluster": {"learner_threads": "auto"}}).cluster.learner_threads == "auto"
    with pytest.raises(ConfigError, match="learner_threads"):
        from_dict({"cluster": {"learner_threads": 0}})
    with pytest.raises(ConfigError, match="learner_threads"):
        from_dict({"cluster": {"learner_threads": "many"}})
    with pytest.raises(ConfigError, match="actor_threads"):
        from_dict({"cluster": {"actor_threads": "auto"}})
