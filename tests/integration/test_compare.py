"""`rrhf-ray compare` on a shortened demo, end to end on a real local Ray cluster: two variants
(rrhf, raft with shorter replies) × one seed start from one shared SFT stage, each runs as its
own run (the second in the first one's sampler engines), and the comparison writes compare.jsonl / compare.md / compare.png; started again, nothing reruns."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.cli import main

pytestmark = pytest.mark.ray

SHORT = ["rounds=1", "sft.train.epochs=1", "data.max_prompts=16", "data.max_eval_prompts=8",
         "train.epochs=1", "sampling.max_new_tokens=16", "eval.max_new_tokens=16", "eval.num_samples=2"]


def state(path):
    return json.loads((path / "state.json").read_text())


def test_compare_runs_each_variant_from_one_shared_sft_stage(ray_cluster, tmp_path, capsys):
    from rrhf_ray.data.pairs import read_sft_pairs
    from rrhf_ray.types import read_groups

    # The SFT stage on the first 320 of the demo's 4,000 uniformly mixed replies (10 steps): the
    # comparison's plumbing, not the demo's quality, is under test.
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"query": p.query, "response": p.response}) + "\n"
                                for p in read_sft_pairs("builtin:demo-sft")[:320]))
    out = tmp_path / "cmp"
    argv = ["compare", "builtin:demo", *SHORT, f"sft.data={sft_data}", "--variant", "rrhf", "--variant",
            "raft:sampling.max_new_tokens=8",
            "--seeds", "0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| variant | round | sampled reward" in printed

    # The shared stages ran once, in shared/seed0; each run adopted them and trained its own loss.
    shared = state(out / "shared" / "seed0")["stages"]
    assert set(shared) == {"base", "sft"} and shared["sft"]["seconds"] > 0
    assert (out / "shared" / "seed0" / "sft" / "model.safetensors").exists()
    for name in ("rrhf", "raft"):
        run = out / name / "seed0"
        s = state(run)
        assert s["config"]["train"]["loss"]["name"] == name
        assert (s["config"]["train"]["seed"], s["config"]["sampling"]["seed"]) == (0, 0)
        assert s["stages"]["sft"]["path"] == str(out / "shared" / "seed0" / "sft")
        assert s["stages"]["sft"]["shared_from"] == str(out / "shared" / "seed0")
        assert s["stages"]["sft"]["seconds"] == 0.0
        assert not (run / "sft").exists() and not (run / "base").exists()  # not redone here
        assert "round1/reference" not in s["stages"]  # only DPO needs a reference
        assert (run / "rounds" / "1" / "checkpoint" / "model.safetensors").exists()
        assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # The second run loaded its weights into the first run's sampler engines (the same engine
    # settings) and its requests asked for its own reply length: 8 tokens at most, not 16.
    assert "kept from the previous run" not in (out / "rrhf" / "seed0" / "logs" / "driver.log").read_text()
    assert "kept from the previous run" in (out / "raft" / "seed0" / "logs" / "driver.log").read_text()
    longest = {n: max(len(ids) for g in read_groups(out / n / "seed0" / "rounds/1/pool.parquet")
                      for ids, source in zip(g.token_ids, g.sources, strict=True)
                      if source.startswith("policy") and ids is not None)
               for n in ("rrhf", "raft")}
    assert longest["raft"] <= 8 < longest["rrhf"], longest
    # Same SFT model, same seed: round 0 is the same policy in both runs.
    r0 = [json.loads((out / n / "seed0" / "metrics.jsonl").read_text().splitlines()[0]) for n in ("rrhf", "raft")]
    assert r0[0]["eval_reward_mean"] == pytest.approx(r0[1]["eval_reward_mean"], abs=0.05)

    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["round"]) for r in rows] == [("rrhf", 0), ("rrhf", 1), ("raft", 0), ("raft", 1)]
    for r in rows:
        assert r["seeds"] == [0]
        for key in ("sampled_reward", "win_rate_vs_round0", "reply_length", "perplexity", "seconds"):
            assert r[key]["n"] == 1 and r[key]["std"] is None, key
        assert r["seconds"]["mean"] > 0
    assert rows[0]["win_rate_vs_round0"]["mean"] == 0.5
    md = (out / "compare.md").read_text()
    assert "| rrhf | 1 |" in md and "| raft | 1 |" in md and "reply length" in md
    assert "- `raft`: `train.loss={name: raft}`, `sampling.max_new_tokens=8`" in md
    assert (out / "compare.png").stat().st_size > 1000

    # Started again: every run is finished, nothing reruns, the outputs are rewritten the same.
    finished = {n: state(out / n / "seed0")["stages"]["round1/train"]["finished"] for n in ("rrhf", "raft")}
    assert main(argv) == 0
    assert {n: state(out / n / "seed0")["stages"]["round1/train"]["finished"] for n in finished} == finished
    assert [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()] == rows
