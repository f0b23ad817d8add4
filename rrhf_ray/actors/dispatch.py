"""Chunked work over a group of Ray actors (samplers, reward scorers): balancing, retry, progress.

Shared by the sampler and reward pools. Work is cut into chunks before anything is shipped; the
caller's `submit(worker, chunk)` returns an ObjectRef; this loop keeps at most
`_IN_FLIGHT_PER_WORKER` chunks queued per worker, hands the next chunk to the least loaded live
worker, and retries a chunk whose worker died on another worker.

While it runs inside a Ray task, the loop keeps a *board* in Ray's key-value store under the
task's id: which worker runs which chunk, since when. The driver reads the board of the task it
waits on (`read_board(ref)`, used by `rrhf_ray.waits.Wait.get`), so state.json and `rrhf-ray
status` name the replica or scorer a sampling or scoring stage is waiting on, not only the stage.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray

logger = logging.getLogger(__name__)

# Two requests queued per replica keep it busy while the coordinator receives the last result.
_IN_FLIGHT_PER_WORKER = 2


def on_callers_node() -> dict[str, Any]:
    """Options for a coordinating task (it runs `dispatch_chunks`) or actor (the warm trainer's
    mailbox): on the caller's node (the driver's), so that losing a worker's node loses only that
    worker's work, never the coordinator of the whole call. Hard affinity: with a soft one Ray
    places a zero-CPU task or actor on another node whenever the caller's is busy starting
    worker processes (seen on a 1-CPU head), where it dies with that node; the caller's node
    outlives the call anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


BOARD_NAMESPACE = "rrhf_ray_dispatch"


def _board_key() -> str | None:
    """This Ray task's id (None outside a task: the loop keeps no board)."""
    try:
        return ray.get_runtime_context().get_task_id()
    except Exception:  # noqa: BLE001 - not in a Ray worker, or no task
        return None


def _publish(key: str | None, running: list[dict[str, Any]] | None) -> None:
    """Write (or, `running` None, delete) the board under `key`; a failed write loses only the
    detail of what the driver shows."""
    if key is None:
        return
    from ray.experimental import internal_kv

    try:
        if running is None:
            internal_kv._internal_kv_del(key, namespace=BOARD_NAMESPACE)
        else:
            internal_kv._internal_kv_put(key, json.dumps(running), overwrite=True, namespace=BOARD_NAMESPACE)
    except Exception as err:  # noqa: BLE001 - a display detail, never the call's failure
        logger.debug("dispatch board %s not written: %s", key, err)


def read_board(ref: ray.ObjectRef) -> list[dict[str, Any]] | None:
    """What the `dispatch_chunks` loop of the task behind `ref` runs now: one entry per busy
    worker, `{"worker": "sampler replica 1", "chunk": 3, "chunks": 12, "queries": 8, "since":
    wall-clock start}`, longest-running first; None when that task keeps no board (not started,
    finished, or no dispatch loop)."""
    from ray.experimental import internal_kv

    try:
        raw = internal_kv._internal_kv_get(ref.task_id().hex(), namespace=BOARD_NAMESPACE)
    except Exception:  # noqa: BLE001 - see _publish
        return None
    return json.loads(raw) if raw else None


def count_tokens(result: Sequence[Sequence[Any]]) -> int:
    """Response tokens in a chunk of candidate lists (objects with `token_ids`)."""
    return sum(len(c.token_ids) for group in result for c in group)


# A piece of work's time limit when none is configured: 10× the longest time the same work took
# (a chunk: the slowest pace seen in this call, seconds per query of a finished chunk, times its
# size; a driver's stage wait: the longest earlier round of the stage, rrhf_ray.waits), and never
# under 5 minutes; 30 minutes before any chunk has finished (an engine's first call may compile or
# warm its caches).
_PACE_FACTOR = 10.0
_MIN_TIMEOUT_S = 300.0
_FIRST_TIMEOUT_S = 1800.0


def work_timeout(measured: Sequence[float], configured: float | None = None,
                 first: float = _FIRST_TIMEOUT_S) -> float:
    """Seconds a piece of work may take (see `_PACE_FACTOR`): `configured` when given, else 10×
    the longest of `measured` (the seconds the same work took before), at least 300 s; `first`
    when nothing was measured yet."""
    if configured is not None:
        return configured
    if not measured:
        return first
    return max(_MIN_TIMEOUT_S, _PACE_FACTOR * max(measured))


def chunk_timeout(size: int, paces: Sequence[float], configured: float | None = None) -> float:
    """Seconds a chunk of `size` queries may run on its worker (`work_timeout`): `configured`
    when given, else derived from `paces` (seconds per query of the chunks finished so far)."""
    return work_timeout([pace * size for pace in paces], configured)


class ChunkTimeout(RuntimeError):
    """A chunk ran past its time limit and no worker was left to run it (or it has no worker to
    replace: a rule task)."""


def dispatch_chunks(num_workers: int, submit: Callable[[int, Any], ray.ObjectRef],
                    chunks: Sequence[Any], sizes: Sequence[int], desc: str | None = None,
                    tokens: Callable[[Any], int] | None = None, *, timeout: float | None = None,
                    kill: Callable[[int], None] | None = None, what: str = "worker") -> list[Any]:
    """Run `submit(worker_index, chunk)` for every chunk on any live worker; results in chunk order.

    Shared by the sampler and reward pools. Runs inside a Ray task (it calls `ray.get`). A chunk
    whose worker died (RayActorError) goes to another worker, so a crashed replica costs one
    chunk's time, not the batch; any other error (bad data, mixed versions) is raised at once.
    A chunk that runs past its time limit (`chunk_timeout`: `timeout`, or derived from the pace of
    the call; its clock starts when its worker starts it, not while it waits in the worker's queue)
    is a hung worker: `kill(worker_index)` kills it (Ray restarts an actor that may restart) and its
    chunks go to the other workers; without `kill` (rule tasks) the chunk is cancelled and the call
    fails, naming it. `what` names a worker in the messages ("replica", "scorer").
    `sizes[i]` is the number of queries of chunk i, for the progress bar; `tokens(result)`
    adds a tokens/s figure.
    """
    from ray.experimental.tqdm_ray import tqdm

    results: list[Any] = [None] * len(chunks)
    pending = deque(range(len(chunks)))
    alive = set(range(num_workers))
    load = dict.fromkeys(alive, 0)
    inflight: dict[ray.ObjectRef, tuple[int, int]] = {}
    queues: dict[int, deque[ray.ObjectRef]] = {w: deque() for w in alive}  # in submission order
    began: dict[ray.ObjectRef, float] = {}  # when its worker started it (the head of its queue)
    paces: list[float] = []
    hung: list[str] = []
    bar = tqdm(total=sum(sizes), desc=desc, unit="query") if desc else None
    start, n_tokens = time.monotonic(), 0
    board, shown = _board_key(), None  # the board: which worker runs which chunk (read_board)
    try:
        while pending or inflight:
            while pending and alive:
                w = min(alive, key=lambda i: load[i])
                if load[w] >= _IN_FLIGHT_PER_WORKER:
                    break
                c = pending.popleft()
                ref = submit(w, chunks[c])
                inflight[ref] = (c, w)
                queues[w].append(ref)
                if len(queues[w]) == 1:
                    began[ref] = time.monotonic()
                load[w] += 1
            if not inflight:
                raise ChunkTimeout(f"every {what} died or hung ({'; '.join(hung)}); {len(pending)} of "
                                   f"{len(chunks)} chunks not done") if hung else \
                    RuntimeError(f"every worker died; {len(pending)} of {len(chunks)} chunks not done")
            now = time.monotonic()
            limits = {ref: began[ref] + chunk_timeout(sizes[inflight[ref][0]], paces, timeout)
                      for ref in began if ref in inflight}
            wait = max(0.0, min(limits.values()) - now) if limits else None
            running = _running(queues, inflight, began, sizes, what, len(chunks))
            if (now_showing := [(e["worker"], e["chunk"]) for e in running]) != shown:
                _publish(board, running)
                shown = now_showing
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
            if not ready:
                now = time.monotonic()
                for ref in [r for r, limit in limits.items() if limit <= now]:
                    c, w = inflight[ref]
                    message = (f"{what} {w} ran chunk {c} ({sizes[c]} queries) for {now - began[ref]:.0f} s, "
                               f"past its limit of {chunk_timeout(sizes[c], paces, timeout):.0f} s")
                    if kill is None:
                        ray.cancel(ref, force=True)
                        raise ChunkTimeout(f"{message}; cancelled (raise the timeout if the work is that slow)")
                    logger.warning("%s: killed, its chunks go to the other %ss", message, what)
                    hung.append(message)
                    kill(w)
                    alive.discard(w)
                    for queued in queues.pop(w):
                        pending.appendleft(inflight.pop(queued)[0])
                        began.pop(queued, None)
                    load[w] = 0
                continue
            [ref] = ready
            c, w = inflight.pop(ref)
            load[w] -= 1
            queues[w].remove(ref)
            if ref in began:
                paces.append((time.monotonic() - began.pop(ref)) / max(sizes[c], 1))
            if queues[w]:
                began.setdefault(queues[w][0], time.monotonic())
            try:
                results[c] = ray.get(ref)
            except ray.exceptions.RayActorError:
                alive.discard(w)  # a restarted actor comes back with ρ's weights: not for this call
                for queued in queues.pop(w, deque()):
                    pending.appendleft(inflight.pop(queued)[0])
                    began.pop(queued, None)
                pending.appendleft(c)
                continue
            if bar is not None:
                if tokens is not None:
                    n_tokens += tokens(results[c])
                    bar.set_description(f"{desc} {n_tokens / (time.monotonic() - start):.0f} tok/s")
                bar.update(sizes[c])
    finally:
        _publish(board, None)
        if bar is not None:
            bar.close()
    return results


def _running(queues: dict[int, deque], inflight: dict, began: dict, sizes: Sequence[int], what: str,
             total: int) -> list[dict[str, Any]]:
    """The board: each worker's chunk at the head of its queue (the one it runs), oldest first."""
    now_wall, now = time.time(), time.monotonic()
    heads = [(began[q[0]], w, inflight[q[0]][0]) for w, q in queues.items() if q and q[0] in began]
    return [{"worker": f"{what} {w}", "chunk": c, "chunks": total, "queries": sizes[c],
             "since": now_wall - (now - t)} for t, w, c in sorted(heads)]
