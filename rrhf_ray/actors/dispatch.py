"""Chunked work over a group of Ray actors (samplers, reward scorers): balancing, retry, progress.

Shared by the sampler and reward pools. Work is cut into chunks before anything is shipped; the
caller's `submit(worker, chunk)` returns an ObjectRef; this loop keeps at most
`_IN_FLIGHT_PER_WORKER` chunks queued per worker, hands the next chunk to the least loaded live
worker, and retries a chunk whose worker died on another worker.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray

# Two requests queued per replica keep it busy while the coordinator receives the last result.
_IN_FLIGHT_PER_WORKER = 2


def on_callers_node() -> dict[str, Any]:
    """Options for a coordinating task (it runs `dispatch_chunks`): on the caller's node (the
    driver's) while that node lives, so that losing a worker's node loses only that worker's
    chunks, never the coordinator of the whole call."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}


def count_tokens(result: Sequence[Sequence[Any]]) -> int:
    """Response tokens in a chunk of candidate lists (objects with `token_ids`)."""
    return sum(len(c.token_ids) for group in result for c in group)


def dispatch_chunks(num_workers: int, submit: Callable[[int, Any], ray.ObjectRef],
                    chunks: Sequence[Any], sizes: Sequence[int], desc: str | None = None,
                    tokens: Callable[[Any], int] | None = None) -> list[Any]:
    """Run `submit(worker_index, chunk)` for every chunk on any live worker; results in chunk order.

    Shared by the sampler and reward pools. Runs inside a Ray task (it calls `ray.get`). A chunk
    whose worker died (RayActorError) goes to another worker, so a crashed replica costs one
    chunk's time, not the batch; any other error (bad data, mixed versions) is raised at once.
    `sizes[i]` is the number of queries of chunk i, for the progress bar; `tokens(result)`
    adds a tokens/s figure.
    """
    from ray.experimental.tqdm_ray import tqdm

    results: list[Any] = [None] * len(chunks)
    pending = deque(range(len(chunks)))
    alive = set(range(num_workers))
    load = dict.fromkeys(alive, 0)
    inflight: dict[ray.ObjectRef, tuple[int, int]] = {}
    bar = tqdm(total=sum(sizes), desc=desc, unit="query") if desc else None
    start, n_tokens = time.monotonic(), 0
    while pending or inflight:
        while pending and alive:
            w = min(alive, key=lambda i: load[i])
            if load[w] >= _IN_FLIGHT_PER_WORKER:
                break
            c = pending.popleft()
            inflight[submit(w, chunks[c])] = (c, w)
            load[w] += 1
        if not inflight:
            raise RuntimeError(f"every worker died; {len(pending)} of {len(chunks)} chunks not done")
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        c, w = inflight.pop(ref)
        load[w] -= 1
        try:
            results[c] = ray.get(ref)
        except ray.exceptions.RayActorError:
            alive.discard(w)  # a restarted actor comes back with ρ's weights: not for this call
            pending.appendleft(c)
            continue
        if bar is not None:
            if tokens is not None:
                n_tokens += tokens(results[c])
                bar.set_description(f"{desc} {n_tokens / (time.monotonic() - start):.0f} tok/s")
            bar.update(sizes[c])
    if bar is not None:
        bar.close()
    return results
