"""`SamplerPool.engine_seconds` without engines: a pool whose `busy_seconds` is a scripted series."""

from __future__ import annotations

import pytest

from rrhf_ray.actors.sampler import SamplerPool


class ScriptedPool(SamplerPool):
    """A SamplerPool with no replicas whose `busy_seconds()` answers the next scripted value."""

    def __init__(self, *answers: float) -> None:  # no super().__init__: no Ray, no engines
        self.answers = list(answers)

    def busy_seconds(self) -> float:
        return self.answers.pop(0)


def test_the_seconds_are_the_busy_seconds_after_the_block_minus_those_before() -> None:
    pool = ScriptedPool(2.5, 4.0)
    with pool.engine_seconds() as busy:
        assert pool.answers == [4.0]  # read once on entry
    assert busy.seconds == 1.5
    assert pool.answers == []  # and once on exit


def test_the_seconds_cannot_be_read_inside_the_block() -> None:
    with ScriptedPool(1.0, 1.0).engine_seconds() as busy, pytest.raises(RuntimeError, match="only after"):
        busy.seconds  # noqa: B018 - the read is the point


def test_an_error_inside_the_block_goes_on_unchanged_and_nothing_is_measured() -> None:
    pool = ScriptedPool(1.0, 9.0)
    with pytest.raises(KeyError, match="boom"), pool.engine_seconds() as busy:
        raise KeyError("boom")
    assert pool.answers == [9.0]  # no replica asked after the failure
    with pytest.raises(RuntimeError, match="only after"):
        busy.seconds  # noqa: B018
