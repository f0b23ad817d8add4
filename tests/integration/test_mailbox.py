"""The mailbox a fit's workers and the driver talk through (rrhf_ray/mailbox.py), on the
session's real Ray cluster: channels are separate FIFO queues in one actor, a `get` blocked on
one channel does not hold up the others, and a `get` that times out raises `queue.Empty`."""

from __future__ import annotations

import queue
import threading

import pytest

pytestmark = pytest.mark.ray


def test_channels_are_separate_fifo_queues_in_one_actor(ray_cluster) -> None:
    from rrhf_ray.mailbox import Mailbox

    box = Mailbox()
    try:
        commands, results = box.channel("commands0"), box.channel("results")
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(commands.get(timeout=60)))
        waiter.start()  # blocked on commands0 while results is used
        for i in range(3):
            results.put({"i": i})
        assert results.qsize() == 3 and commands.qsize() == 0
        assert [results.get(timeout=5)["i"] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(queue.Empty):
            results.get(timeout=0.2)
        with pytest.raises(queue.Empty):
            results.get_nowait()
        commands.put({"kind": "stop"})
        waiter.join(timeout=30)
        assert got == [{"kind": "stop"}]
        # A channel handle travels to another process (a worker's config) and reaches the same queue.
        import ray

        @ray.remote(num_cpus=0)
        def answer(channel) -> None:
            channel.put("from a task")

        ray.get(answer.remote(results))
        assert results.get(timeout=5) == "from a task"
    finally:
        box.shutdown()
