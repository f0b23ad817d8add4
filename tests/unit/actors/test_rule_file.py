"""A reward rule given as a Python file (`reward.rule: my_reward.py:score`): the file is made
absolute when the config loads, as data paths are, and loaded by path in whichever process scores
(no package to install, no PYTHONPATH)."""

from __future__ import annotations

import pytest

from rrhf_ray.actors.scorer import load_rule
from rrhf_ray.config import RunConfig
from rrhf_ray.config.run import with_absolute_paths
from rrhf_ray.types import DataError


def test_a_rule_file_relative_to_the_working_directory_is_made_absolute_and_loads(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_reward.py").write_text(
        "def score(queries, responses):\n    return [float(len(r.split())) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(RunConfig(model={"name_or_path": "m"}, data={"source": "d.jsonl"},
                                           reward={"kind": "rule", "rule": "my_reward.py:score"}))
    assert config.reward.rule == f"{tmp_path / 'my_reward.py'}:score"
    monkeypatch.chdir("/")  # a Ray worker's own working directory
    assert load_rule(config.reward.rule)(["q", "q"], [" two words", " one"]) == [2.0, 1.0]
    assert load_rule(config.reward.rule) is load_rule(config.reward.rule)  # loaded once per process


def test_a_missing_rule_file_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match=f"reward.rule '{tmp_path}/nope.py:score': file not found: {tmp_path}/nope.py"):
        load_rule(f"{tmp_path}/nope.py:score")
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="r.py has no function 'score'"):
        load_rule(f"{tmp_path}/r.py:score")
