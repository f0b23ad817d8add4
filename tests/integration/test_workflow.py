"""The driver on a real local Ray cluster: refusals before any Ray work. (Resume after a killed
driver: tests/integration/test_object_storage.py; after faults and stop signals: test_faults.py.)"""

from __future__ import annotations

import pytest

from rrhf_ray.cli import main
from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState
from tests.helpers import QUICK

pytestmark = pytest.mark.ray


def test_a_different_config_in_an_existing_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    RunState(out, load_config(DEMO_CONFIG, QUICK + [f"output.dir={out}"]))
    with pytest.raises(ConfigError, match="different config"):
        RunState(out, load_config(DEMO_CONFIG, QUICK + [f"output.dir={out}", "train.lr=0.1"]))
    RunState(out, load_config(DEMO_CONFIG, QUICK + [f"output.dir={out}", "rounds=4"]))  # more rounds: fine


def test_config_error_stops_before_any_ray_work(tmp_path, capsys, monkeypatch):
    """A config error ends `rrhf-ray run` before the workflow starts: Ray is neither started nor
    joined (whether or not this process is connected already), and nothing is written."""
    import ray

    import rrhf_ray.cli
    import rrhf_ray.workflow

    calls: list[str] = []

    def spy(name, result=None):
        def record(*args, **kwargs):
            calls.append(name)
            return result
        return record

    monkeypatch.setattr(ray, "init", spy("ray.init"))
    monkeypatch.setattr(rrhf_ray.workflow, "connect_ray", spy("connect_ray"))
    monkeypatch.setattr(rrhf_ray.cli, "connect_ray", spy("connect_ray"))
    monkeypatch.setattr(rrhf_ray.workflow, "run", spy("run", []))

    rc = main(["run", "train.epochz=2", f"output.dir={tmp_path / 'x'}"])
    assert rc == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert calls == [], f"a config error still reached {calls}"
    assert not (tmp_path / "x").exists()

    # The same command with a valid config reaches the workflow: the spies are on its path.
    assert main(["run", *QUICK, f"output.dir={tmp_path / 'y'}"]) == 0
    assert calls == ["run"]
