"""Every run config users submit (workflows/*.yaml, and the packaged default) passes
`rrhf-ray validate` as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_ray.cli import main
from rrhf_ray.config import load_config

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.yaml"))


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"hh_llama7b.yaml"}


def test_validate_without_a_config_resolves_the_packaged_default(capsys):
    assert main(["validate", "rounds=2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "rounds: 2" in out and "builtin:demo-tiny-llama" in out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_validates(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "rounds:" in capsys.readouterr().out


def test_hh_llama7b_has_the_papers_settings():
    """docs/algorithm.md §"Reference hyper-parameters": the values a faithful 7B run needs."""
    c = load_config(Path(__file__).resolve().parents[2] / "workflows" / "hh_llama7b.yaml")
    assert c.data.source == "Dahoas/rm-static" and c.data.format == "rm-static"
    assert c.reward.kind == "model" and c.reward.model == "Dahoas/gptj-rm-static"
    assert c.sampling.preset.startswith(("IP", "DP")) and c.sampling.n + 2 == 6  # + chosen, rejected
    t = c.train
    assert (t.epochs, t.lr, t.queries_per_step, t.max_length) == (3, 2e-5, 64, 192)
    assert t.bf16 and t.use_gpu and t.strategy == "fsdp" and t.num_workers == 8
    assert t.queries_per_step // (t.micro_batch_queries * t.num_workers) == 8  # 1 query per GPU × 8 GPUs × 8 accumulation
    assert c.sampling.use_gpu and c.sampling.tensor_parallel_size > 1
    assert c.model.trust_remote_code is False
    assert Path(c.output.dir).is_absolute()  # a submitted job runs in an unpacked working dir
