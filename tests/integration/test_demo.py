"""The embedded default, shortened (fewer prompts and epochs, 3 rounds), end to end on a real
local Ray cluster: SFT → round 0 evaluation → 3 RRHF rounds, the held-out reward rises, and the
refresh check would have caught a sampler serving the previous round's weights in every round.
The rounds' weights reach the samplers through Ray's object store (`sampling.refresh_transport:
memory`); every other run of the suite refreshes from disk."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.cli import main

pytestmark = pytest.mark.ray

SHORT = ["rounds=3", "sft.train.epochs=3", "data.max_prompts=96", "data.max_eval_prompts=24",
         "eval.num_samples=2", "sampling.refresh_transport=memory"]


def test_shortened_demo_raises_the_held_out_reward(ray_cluster, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output.dir, as in the README's command
    out = tmp_path / "demo"
    assert main(["run", *SHORT, "output.dir=demo"]) == 0
    captured = capfd.readouterr()  # file-descriptor level: what a user's terminal would show
    printed = captured.out
    table = [line for line in printed.splitlines() if line.startswith("|")]  # the table that ends the run
    assert table[0].startswith("| round | sampled reward [95 % CI] |") and len(table) == 2 + 4
    assert max(len(line) for line in table) <= 80  # an 80-column terminal does not wrap it
    assert "Every column: demo/summary.md" in printed  # where every other column is

    # A quiet console: one line per stage with its numbers; vLLM, Ray and transformers in logs/.
    console = (captured.out + captured.err).splitlines()
    assert len(console) < 40, "\n".join(console)
    assert not [line for line in console if "WARNING" in line or "Attempted to load weight" in line]
    driver_log = (out / "logs" / "driver.log").read_text()  # (pytest owns the logging console)
    assert "round2/eval done in" in driver_log
    # Round r's evaluation and round r+1's sampling ran as one engine pass, recorded as two stages.
    assert "round0/eval + round1/sample: starting" in driver_log
    assert "round1/sample done in" in driver_log and "(one pass with round0/eval)" in driver_log
    assert "round2/train done in" in driver_log and "rank acc" in driver_log
    assert "round1/refresh done in" in driver_log and "log-prob gap" in driver_log
    samplers = list((out / "logs").glob("sampler-policy*.log"))
    assert samplers and any("vllm" in f.read_text().lower() for f in samplers)
    assert list((out / "logs").glob("train-*.log"))
    # Round checkpoints are saved in the dtype the engines serve (bf16 for the fp32 demo model
    # under sampling.dtype auto): the two round refreshes cast nothing. vLLM's "Attempted to load
    # weight …" warnings (one per weight and load) come only from loading the fp32 base / SFT
    # models (kept fp32: the trainer starts from them): at most two loads' worth, not four.
    for f in samplers:
        cast = [line.split("Attempted to load weight ")[1].split()[0]
                for line in f.read_text().splitlines() if "Attempted to load weight" in line]
        assert len(cast) <= 2 * len(set(cast)), f"{len(cast)} cast warnings in {f}"
    from safetensors import safe_open

    with safe_open(str(out / "rounds" / "2" / "checkpoint" / "model.safetensors"), "pt") as st:
        names = st.keys()  # safe_open has keys(), no __iter__
        assert {str(st.get_tensor(k).dtype) for k in names} == {"torch.bfloat16"}
    # Each round's weights went to the one replica through the object store, in the served dtype:
    # exactly the checkpoint's tensor bytes (which are written all the same), no download.
    stages = json.loads((out / "state.json").read_text())["stages"]
    for r in (1, 2, 3):
        with safe_open(str(out / "rounds" / str(r) / "checkpoint" / "model.safetensors"), "pt") as st:
            saved = sum(st.get_tensor(k).nbytes for k in st.keys())  # noqa: SIM118 - no __iter__
        refresh = stages[f"round{r}/refresh"]
        assert refresh["transport"] == "memory" and "checkpoint_download" not in refresh
        assert (refresh["state_dict_fetch"]["bytes"], refresh["state_dict_fetch"]["replicas"]) == (saved, 1)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        for key in ("eval_reward_mean", "eval_reward_std", "reference_perplexity", "win_rate_vs_round0",
                    "train_loss", "seconds_sample", "seconds_score", "seconds_train", "seconds_eval"):
            assert key in row, key
    # Tracking (TensorBoard is on by default): the event files hold metrics.jsonl's values by
    # round and every training step of every round on one increasing global step.
    from tests.helpers import tensorboard_scalars

    _, scalars = tensorboard_scalars(out / "tensorboard")
    for key in ("sampled_reward_mean", "eval_reward_mean", "train_loss", "seconds_overhead"):
        logged = dict(scalars[key])
        want = {r["round"]: r[key] for r in rows if r.get(key) is not None}
        assert logged == pytest.approx(want, rel=1e-6), key
    history = [json.loads(line) for r in (1, 2, 3)
               for line in (out / "rounds" / str(r) / "train_history.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == [h["global_step"] for h in history] == list(
        range(1, len(history) + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert (out / "summary.md").read_text().count("best sampled reply") >= 1  # readable samples

    r0, r2 = rows[0], rows[2]
    # The fixed seed makes this run deterministic up to CPU float reductions; the margins are wide
    # (round 0 → 2 measured: greedy +0.50 → +0.97, sampled −0.05 → +0.48).
    assert r2["eval_reward_mean"] > r0["eval_reward_mean"] + 0.2
    assert r2["sampled_reward_mean"] > r0["sampled_reward_mean"] + 0.2
    assert r2["win_rate_vs_round0"] > 0.7
    assert r2["reference_perplexity"] < r0["reference_perplexity"]  # the ideal replies became more likely
    assert rows[1]["train_loss"] > 0 and rows[1]["pool_reward_mean"] is not None

    for r in (1, 2):
        rd = out / "rounds" / str(r)
        assert (rd / "checkpoint" / "model.safetensors").exists()
        assert (rd / "pool.parquet").exists() and (rd / "metrics.json").exists()
        pool = [json.loads(line) for line in (rd / "pool.jsonl").read_text().splitlines()]
        assert len(pool) == 96 and all(set(p) >= {"query", "responses", "scores"} for p in pool)
    assert (out / "report.png").stat().st_size > 1000
    assert "| 3 |" in (out / "summary.md").read_text()
    assert_the_refresh_check_catches_stale_weights(out, rows)


def assert_the_refresh_check_catches_stale_weights(out, rows) -> None:
    """In each round, one engine serving the round's checkpoint passes the run's own refresh
    check, and serving the previous round's weights (round 1: ρ, the SFT model) fails it."""
    import ray
    from transformers import AutoTokenizer

    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.config import load_config
    from rrhf_ray.demo import DEMO_CONFIG
    from rrhf_ray.refresh import StaleWeightsError, probe_sequences, tolerance_for, verify_refresh

    stages = json.loads((out / "state.json").read_text())["stages"]
    sampling = load_config(DEMO_CONFIG, SHORT).sampling.model_copy(update={"num_replicas": 1})
    tolerance = tolerance_for("bfloat16", sampling.refresh_tolerance)  # the checkpoints' dtype
    weights = [stages["sft"]["path"]] + [str(out / "rounds" / str(r) / "checkpoint") for r in (1, 2, 3)]
    tok = AutoTokenizer.from_pretrained(weights[0])
    for r in (1, 2, 3):
        assert rows[r]["refresh_logprob_gap"] < tolerance < rows[r]["refresh_logprob_separation"]
    pool = SamplerPool(weights[0], sampling, version=0)
    try:
        for r in (1, 2, 3):
            probe = probe_sequences(out / "rounds" / str(r) / "pool.parquet", tok)
            new, old = stages[f"round{r}/train"]["probe_logprobs"], stages[f"round{r}/train"]["probe_start_logprobs"]
            ray.get(pool.load_weights_refs(weights[r - 1], r))  # the previous round's weights, labelled r
            with pytest.raises(StaleWeightsError, match=f"does not serve round {r}'s weights"):
                verify_refresh(pool, probe, new, old, tolerance, r)
            ray.get(pool.load_weights_refs(weights[r], r))
            assert verify_refresh(pool, probe, new, old, tolerance, r)["logprob_gap"] < tolerance
    finally:
        pool.shutdown()

