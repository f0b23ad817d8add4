"""`rrhf-ray compare` connects to Ray with its own directory as the run's: its driver.log goes to
`<compare dir>/logs/`, never into the base config's output.dir (the demo's `outputs/demo`, where
the suite used to append a compare test's lines to a user's log)."""

from __future__ import annotations

import pytest

import rrhf_ray.connection
from rrhf_ray.compare import Plan, parse_variant, run_compare
from rrhf_ray.demo import DEMO_CONFIG


class _Connected(Exception):
    """Raised by the spy once compare has connected: nothing past the connection runs."""


def test_compare_logs_into_its_own_directory(tmp_path, monkeypatch):
    seen = []

    def spy(config):
        seen.append(config.output.dir)
        raise _Connected

    monkeypatch.setattr(rrhf_ray.connection, "connect_ray", spy)
    plan = Plan(str(DEMO_CONFIG), ["rounds=1"], [parse_variant("rrhf")], [0], tmp_path / "cmp")
    assert plan.base.output.dir == "outputs/demo"  # the base config's own directory
    with pytest.raises(_Connected):
        run_compare(plan)
    assert seen == [str(tmp_path / "cmp")]
