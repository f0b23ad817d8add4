"""`Mailbox`: named channels through which a fit's workers and the driver pass messages.

Its actor's module imports nothing heavy (no torch, no transformers): the Ray worker process that
hosts a mailbox imports this module and Ray, nothing else.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any


class _MailboxActor:
    """The channels of a `Mailbox`: named FIFO queues in one asyncio actor (a blocked `get`
    waits without holding the actor: every channel serves at once)."""

    def __init__(self) -> None:
        self._channels: dict[str, asyncio.Queue] = {}

    def _queue(self, name: str) -> asyncio.Queue:
        q = self._channels.get(name)
        if q is None:  # a channel exists from its first use, by either side
            q = self._channels[name] = asyncio.Queue()
        return q

    async def put(self, name: str, item: Any) -> None:
        self._queue(name).put_nowait(item)

    async def get(self, name: str, timeout: float | None) -> tuple[bool, Any]:
        """(True, the oldest item) or (False, None) when none came within `timeout` s."""
        try:
            return True, await asyncio.wait_for(self._queue(name).get(), timeout)
        except TimeoutError:
            return False, None

    async def get_nowait(self, name: str) -> tuple[bool, Any]:
        try:
            return True, self._queue(name).get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    async def qsize(self, name: str) -> int:
        return self._queue(name).qsize()


class Channel:
    """One named channel of a `Mailbox`, with the part of `queue.Queue`'s interface a fit uses
    (`put`, `get` with a timeout, `get_nowait`, `qsize`); picklable, so a worker gets it in its
    train loop's config. Nothing in time: `queue.Empty`."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor, self.name = actor, name

    def put(self, item: Any) -> None:
        import ray

        ray.get(self.actor.put.remote(self.name, item))

    def get(self, timeout: float | None = None) -> Any:
        import ray

        ok, item = ray.get(self.actor.get.remote(self.name, timeout))
        if not ok:
            raise queue.Empty
        return item

    def get_nowait(self) -> Any:
        import ray

        ok, item = ray.get(self.actor.get_nowait.remote(self.name))
        if not ok:
            raise queue.Empty
        return item

    def qsize(self) -> int:
        import ray

        return ray.get(self.actor.qsize.remote(self.name))


class Mailbox:
    """Named channels (`channel`) through which a fit's workers and the driver pass messages: the
    warm trainer's commands (a channel per worker) and results, and where each worker runs
    (`WorkerNodes`). One actor (no CPU) holds them all, on the driver's node. Placed anywhere, it
    could land on a trainer worker's node and die with it: the restarted workers would then find
    no channel to talk to the driver through, and a lost node would cost the run instead of the
    round. One actor, not one per channel (as `ray.util.queue.Queue` would have it): each actor
    is a process to start, ~1 s of CPU."""

    def __init__(self) -> None:
        import ray

        from rrhf_ray.actors.dispatch import on_callers_node

        self.actor = ray.remote(num_cpus=0)(_MailboxActor).options(**on_callers_node()).remote()

    def channel(self, name: str) -> Channel:
        return Channel(self.actor, name)

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)
