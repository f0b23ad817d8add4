"""README.md's "Your own model, data and reward": its three files, copied from the README as they
stand (`<!-- example: NAME -->` before each block), run with `rrhf-ray run` from their directory
as a driver joining the session's cluster. Only the model (the README's placeholder path) and the
reply lengths (shorter, for the suite's time) are overridden. The rewards in the pools are the
README's function's, so the file rule was loaded and called by the scoring tasks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rrhf_ray.types import read_groups
from tests.helpers import REPO, TOPICS

pytestmark = pytest.mark.ray


def readme_examples() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    return dict(re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.DOTALL))


def test_the_readmes_own_task_runs_as_written(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    files = readme_examples()
    assert set(files) == {"prompts.jsonl", "my_reward.py", "my_task.yaml"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    # More queries in the README's format: enough for a held-out share and a few training steps.
    extra = [{"query": f"\n\nHuman: How do I {t} (case {i})?\n\nAssistant:"} for i, t in enumerate(TOPICS * 2)]
    with (tmp_path / "prompts.jsonl").open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in extra)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    overrides = [f"model.name_or_path={tiny_model_dir}", "sampling.max_new_tokens=16", "eval.max_new_tokens=16"]
    proc = subprocess.run([sys.executable, "-m", "rrhf_ray", "run", "my_task.yaml", *overrides],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "outputs/my_task"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    spec = importlib.util.spec_from_file_location("readme_reward", tmp_path / "my_reward.py")
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    for r in (1, 2):
        groups = read_groups(out / f"rounds/{r}/pool.parquet")
        assert len(groups) == 21  # 26 queries, a held-out 20 % of them (5) never trained on
        for g in groups:
            assert g.scores == pytest.approx(reward.score([g.query] * g.k, g.responses))
