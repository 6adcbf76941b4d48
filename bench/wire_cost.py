"""CPU cost of the wire per engine step: demo-sized rollouts as single messages vs one batch.

Builds ``--num`` rollouts shaped like the CPU demo's (a ~10-token prompt, ~4 answer
tokens, top-k ``--top-k`` as in ``bench/vs_trl.py``'s topk side) and their scored
versions, then times, per rollout:

- ``codec``: encode + decode (which validates every invariant) of each as its own
  message, against one :class:`~asyncopd.types.RolloutBatch` / ``ScoredBatch``;
- ``socket``: the same through a real ZeroMQ PUSH -> PULL pair on loopback
  (:class:`~asyncopd.transport.sockets.Channel`, with CURVE and a job key as in a
  job unless ``--no-curve``), send and receive, which adds the per-frame costs a
  batch saves.

- ``frames``: encode + decode of one batch frame of 1, 2, 4, 8, 32 and ``--num`` rollouts in the
  columnar form the codec sends from 4 rollouts on (:mod:`asyncopd.transport.columns`) against the
  element-by-element form (what peers sent before the columns, still accepted), per frame:
  the columns trade a fixed cost per frame for a much smaller one per element.

Each figure is the fastest of ``--repeats`` runs, single and batch taking turns. Run
it under ``/work/bin/exclusive`` for numbers to report. The ``array`` lines time the
codec's numpy extension hooks alone (encode + decode of one array). With an older checkout on
``PYTHONPATH`` (no batch types) it times the single messages only, which is how the
array-encoding change is compared before/after.

    python bench/wire_cost.py [--num 128] [--top-k 16] [--repeats 200] [--no-curve]

Last line: ``wire_cost single_us <r> batch_us <r> ratio <single/batch>`` (scored
rollouts through the socket, the teacher -> learner hop, microseconds per rollout).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zmq

from asyncopd import types
from asyncopd.transport.codec import decode, encode
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, ScoredRollout

HAS_BATCHES = hasattr(types, "RolloutBatch")
HAS_COLUMNS = hasattr(types, "build_checked")


def demo_pair(i: int, top_k: int, rng: np.random.Generator) -> tuple[Rollout, ScoredRollout]:
    n, vocab = 4, 20
    topk = None if top_k == 0 else np.argsort(rng.random((n, vocab)), axis=1)[:, :top_k].astype(np.int32)
    rollout = Rollout(
        rollout_id=f"0-t{i}.0", kind="train", batch_index=3, group_id=i, actor_index=0,
        prompt_ids=rng.integers(0, vocab, 10).astype(np.int32), response_ids=rng.integers(0, vocab, n).astype(np.int32),
        behaviour_logprobs=-rng.random(n).astype(np.float32), token_policy_versions=np.full(n, 3, np.int32),
        policy_version=3, reward=1.0, finish_reason="stop", student_topk_ids=topk)
    ids = logprobs = None
    if top_k:
        ids = np.concatenate([topk, np.full((n, top_k), -1, np.int32)], axis=1)
        logprobs = np.where(ids >= 0, -1.0, 0.0).astype(np.float32)
    scored = ScoredRollout(rollout=rollout, teacher_logprobs=-rng.random(n).astype(np.float32), teacher_index=0,
                           score_s=1e-3, policy_version=3, topk_ids=ids, topk_logprobs=logprobs)
    return rollout, scored


def per_item_us(fns: dict[str, object], num_items: int, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each function, in microseconds per item. The
    functions take turns run by run, so a slower stretch of the machine hits them alike;
    the minimum is the least disturbed run."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds / num_items * 1e6 for name, seconds in best.items()}


def array_us(repeats: int) -> dict[str, float]:
    """The codec's numpy hooks alone, per demo-sized array: encode hook, extension hook,
    and the ``dec_hook`` call per array where the codec still has one (before this bench)."""
    from asyncopd.transport import codec

    dec_hook = getattr(codec, "_dec_hook", None)
    fns = {}
    for name, array in {"1-d [4] int32": np.arange(4, dtype=np.int32),
                        "2-d [4, 32] int32": np.zeros((4, 32), np.int32)}.items():
        ext = codec._enc_hook(array)
        data = memoryview(ext.data)

        def round_trip(array=array, code=ext.code, data=data) -> None:
            for _ in range(100):
                codec._enc_hook(array)
                decoded = codec._ext_hook(code, data)
                if dec_hook is not None:
                    dec_hook(np.ndarray, decoded)

        fns[name] = round_trip
    return per_item_us(fns, 100, repeats)


def frames_us(pairs: list, sizes: list[int], repeats: int) -> dict[tuple[str, int, str], float]:
    """Encode + decode of one RolloutBatch / ScoredBatch frame of each size, columnar (what
    the codec sends) and element by element (the form older peers sent), us per frame."""
    import msgspec

    from asyncopd.transport import codec

    from asyncopd.transport import columns

    encoder = msgspec.msgpack.Encoder(enc_hook=codec._enc_hook)  # encodes what it is given, in either form

    def to_columns(batch):
        return (columns.rollout_columns if isinstance(batch, types.RolloutBatch) else columns.scored_columns)(batch)

    fns = {}
    for m in sizes:
        for kind, batch in (("rollout", types.RolloutBatch.of([r for r, _ in pairs[:m]])),
                            ("scored", types.ScoredBatch.of([s for _, s in pairs[:m]]))):
            fns[kind, m, "columns"] = lambda b=batch: decode(encoder.encode(to_columns(b)))
            fns[kind, m, "rows"] = lambda b=batch: decode(encoder.encode(b))
    return per_item_us(fns, 1, repeats)


def codec_round_trip(messages: list) -> None:
    for message in messages:
        decode(encode(message))


def socket_round_trip(push: Channel, pull: Channel, messages: list) -> None:
    for message in messages:
        push.send(message)
    for _ in messages:
        assert pull.recv(timeout_s=5.0) is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=128, help="rollouts per engine step (demo: learner.batch_size)")
    parser.add_argument("--top-k", type=int, default=16, help="teacher.top_k (0: off)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-curve", action="store_true", help="plain sockets (a job uses CURVE by default)")
    args = parser.parse_args()
    if not args.no_curve:
        from asyncopd.transport.security import JobKey
        from asyncopd.transport.sockets import configure_security

        configure_security(JobKey.generate())

    rng = np.random.default_rng(0)
    pairs = [demo_pair(i, args.top_k, rng) for i in range(args.num)]
    kinds = {"rollout": [r for r, _ in pairs], "scored": [s for _, s in pairs]}
    batched = {}
    if HAS_BATCHES:
        batched = {"rollout": [types.RolloutBatch.of(kinds["rollout"])],
                   "scored": [types.ScoredBatch.of(kinds["scored"])]}
    print(f"{args.num} demo rollouts (4 answer tokens, top_k={args.top_k}), us per rollout, fastest of "
          f"{args.repeats}; encoded sizes: rollout {len(encode(kinds['rollout'][0]))} B, "
          f"scored {len(encode(kinds['scored'][0]))} B; sockets {'plain' if args.no_curve else 'CURVE'}")
    push = Channel(zmq.PUSH, bind_host="127.0.0.1")
    pull = Channel(zmq.PULL, connect=[push.address])
    result: dict[tuple[str, str, str], float] = {}
    try:
        socket_round_trip(push, pull, kinds["rollout"][:4])  # connected
        for kind, singles in kinds.items():
            fns = {}
            for shape, messages in (("single", singles), ("batch", batched.get(kind))):
                if messages is not None:
                    fns["codec", kind, shape] = lambda m=messages: codec_round_trip(m)
                    fns["socket", kind, shape] = lambda m=messages: socket_round_trip(push, pull, m)
            result.update(per_item_us(fns, args.num, args.repeats))
    finally:
        push.close()
        pull.close()
        if not args.no_curve:
            configure_security(None)
    for name, us in array_us(args.repeats).items():
        print(f"array {name}: hooks, encode + decode {us:.2f} us")
    print(f"{'path':8} {'message':8} {'single':>9} {'batch':>9} {'ratio':>7}")
    for path in ("codec", "socket"):
        for kind in kinds:
            single, batch = result[path, kind, "single"], result.get((path, kind, "batch"), float("nan"))
            print(f"{path:8} {kind:8} {single:9.2f} {batch:9.2f} {single / batch:7.2f}")
    if HAS_COLUMNS:
        sizes = sorted({1, 2, 4, 8, 32, args.num})
        frames = frames_us(pairs, sizes, args.repeats)
        print(f"{'frame':8} {'rollouts':>8} {'rows us':>9} {'columns us':>10} {'ratio':>7}   "
              "(encode + decode, per frame)")
        for kind in kinds:
            for m in sizes:
                r, c = frames[kind, m, "rows"], frames[kind, m, "columns"]
                print(f"{kind:8} {m:8d} {r:9.1f} {c:10.1f} {r / c:7.2f}")
    single, batch = result["socket", "scored", "single"], result.get(("socket", "scored", "batch"), float("nan"))
    print(f"wire_cost single_us {single:.2f} batch_us {batch:.2f} ratio {single / batch:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
