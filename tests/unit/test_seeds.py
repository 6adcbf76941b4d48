"""Replicate seeds (run.seed): one setting moves the prompt stream, the actors'
sampling and the learner RNG; it leaves the held-out set alone; replicate 0 keeps
the streams the job had before."""

from __future__ import annotations

import itertools

from asyncopd.actor.worker import ActorLoop, _Request
from asyncopd.config import TaskConfig, from_dict
from asyncopd.seeds import job_seeds, mix_seed
from asyncopd.tasks import Prompt, load_task
from asyncopd.tasks.jsonl import JsonlTask


def take(task, n: int = 20) -> list[str]:
    return [p.text for p in itertools.islice(task.train_prompts(0, 1), n)]


def test_replicate_zero_keeps_the_configured_seeds_and_others_move_every_stream() -> None:
    base = from_dict({"actor": {"seed": 3}, "learner": {"seed": 5}})
    assert job_seeds(base).actor == 3 and job_seeds(base).learner == 5 and job_seeds(base).prompt_order == 0
    one = job_seeds(from_dict({"actor": {"seed": 3}, "learner": {"seed": 5}, "run": {"seed": 1}}))
    two = job_seeds(from_dict({"actor": {"seed": 3}, "learner": {"seed": 5}, "run": {"seed": 2}}))
    assert one == job_seeds(from_dict({"actor": {"seed": 3}, "learner": {"seed": 5}, "run": {"seed": 1}}))
    assert len({3, one.actor, two.actor}) == 3 and len({5, one.learner, two.learner}) == 3
    assert (one.prompt_order, two.prompt_order) == (1, 2)
    assert 0 <= mix_seed(2**40, 7, "actor") < 2**31


def test_the_prompt_stream_moves_with_the_replicate_and_the_held_out_set_does_not() -> None:
    cfg = TaskConfig(num_eval_prompts=30)
    r0, r0_again, r1 = load_task(cfg), load_task(cfg, replicate=0), load_task(cfg, replicate=1)
    assert take(r0) == take(r0_again)
    assert take(r0) != take(r1)
    assert take(load_task(cfg, replicate=1)) == take(r1)
    assert [p.text for p in r0.eval_prompts()] == [p.text for p in r1.eval_prompts()]
    held_out = {p.text for p in r1.eval_prompts()}
    assert not held_out & set(take(r1, 500))


def test_jsonl_epoch_order_moves_with_the_replicate() -> None:
    train = [Prompt(text=f"q{i}", answer=str(i), index=i) for i in range(50)]
    evals = [Prompt(text="e", answer="0", index=0)]
    order = {r: take(JsonlTask(train, evals, seed=0, replicate=r), 50) for r in (0, 1)}
    assert order[0] == take(JsonlTask(train, evals, seed=0), 50)
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


class RecordingEngine:
    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    def add(self, request_id, prompt_ids, *, greedy=False, seed=None, temperature=None) -> None:
        self.seeds.append(seed)


def sampling_seeds(run_seed: int, actor_index: int = 0) -> list[int | None]:
    cfg = from_dict({"run": {"seed": run_seed}, "cluster": {"actors": 2}, "learner": {"batch_size": 8}})
    engine = RecordingEngine()
    loop = ActorLoop(cfg, actor_index, engine=engine, task=None, tokenizer=None, weight_group=None, inbox=None,
                     dealer=[None], stats_out=None)  # a pool of one teacher that is never sent to
    prompt = Prompt(text="1+2=", answer="3", index=actor_index)  # held-out prompts are split among actors
    group = actor_index  # so are prompt groups (group ids are global)
    for kind, sample in (("train", 0), ("train", 1), ("eval_sample", 0), ("eval_greedy", 0)):
        loop._submit(_Request(kind, prompt, [1, 2], group, 0, sample))
    return engine.seeds


def test_actor_sampling_seeds_follow_the_replicate_seed() -> None:
    assert sampling_seeds(0) == sampling_seeds(0)
    assert sampling_seeds(0)[3] is None  # greedy evaluation draws nothing
    assert len(set(sampling_seeds(0)[:3])) == 3  # each request its own seed
    assert set(sampling_seeds(0)[:3]).isdisjoint(sampling_seeds(1)[:3])
    assert set(sampling_seeds(0, actor_index=0)[:3]).isdisjoint(sampling_seeds(0, actor_index=1)[:3])
