"""The driver on a real local Ray cluster: outputs, resume after a killed driver, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import rrhf_ray
from rrhf_ray.cli import main
from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState
from tests.helpers import QUICK, kill_driver_when

pytestmark = pytest.mark.ray

def stages(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())["stages"]


def test_killed_driver_resumes_without_redoing_finished_stages(ray_cluster, tmp_path):
    out = tmp_path / "run"
    # Round 1 trains for a few seconds (30 epochs of 2 steps): the kill lands before it ends.
    overrides = QUICK + ["train.epochs=30", f"output.dir={out}"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    kill_driver_when(overrides, env, lambda: (out / "state.json").exists() and "round1/score" in stages(out),
                     "round1/score")
    before = stages(out)
    assert "round1/train" not in before
    pool_mtime = (out / "rounds/1/pool.parquet").stat().st_mtime_ns

    # Resumed asking for one more round than the killed run had: it finishes round 1 where it
    # stopped and continues with round 2 (only `rounds` may change within an output directory, and
    # how the weights reach the samplers: these rounds refresh them through the object store).
    # Through the Python API (rrhf_ray.api.run): a RunConfig plus a keyword override.
    rows = rrhf_ray.run(load_config(DEMO_CONFIG, overrides + ["sampling.refresh_transport=memory"]), rounds=2)

    after = stages(out)
    for name in ("base", "round0/eval", "round1/sample", "round1/score"):
        assert after[name]["finished"] == before[name]["finished"], f"{name} was redone"
    assert (out / "rounds/1/pool.parquet").stat().st_mtime_ns == pool_mtime
    # Round 0's evaluation and round 1's sampling were one engine pass; so were round 1's
    # evaluation and round 2's sampling after the resume.
    assert before["round1/sample"]["batched_with"] == ["round0/eval"]
    assert after["round2/sample"]["batched_with"] == ["round1/eval"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    from safetensors import safe_open

    for r in (1, 2):
        assert (out / f"rounds/{r}/checkpoint/model.safetensors").exists()  # written all the same
        with safe_open(str(out / f"rounds/{r}/checkpoint/model.safetensors"), "pt") as st:
            saved = sum(st.get_tensor(k).nbytes for k in st.keys())  # noqa: SIM118 - no __iter__
        refresh = after[f"round{r}/refresh"]
        assert refresh["transport"] == "memory" and "checkpoint_download" not in refresh
        assert (refresh["state_dict_fetch"]["bytes"], refresh["state_dict_fetch"]["replicas"]) == (saved, 1)
        assert refresh["logprob_gap"] < refresh["logprob_separation"] / 2  # the probe passed it
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for key in ("eval_reward_mean", "eval_reward_std", "reference_perplexity", "win_rate_vs_round0",
                "train_loss", "seconds_train", "seconds_sample"):
        assert key in metrics[1] and key in metrics[2]
    assert metrics[1]["train_loss"] > 0 and metrics[1]["seconds_train"] > 0
    assert "| 2 |" in (out / "summary.md").read_text()
    assert not list(out.rglob(".*tmp*")), "a temporary file was left behind"


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
