"""The trainer without Ray: tokenisation, padding, accumulation and chunking invariances,
and checkpoints that reload to the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_ray.config import LoraConfig, TrainConfig
from rrhf_ray.train.checkpoints import save_hf_checkpoint
from rrhf_ray.train.encoding import Encoder, end_token_ids, group_tensors
from rrhf_ray.train.loop import MicroBatch, micro_batches, plan_steps, round_train_seed
from rrhf_ray.train.rrhf import (
    TrainJob,
    candidate_logprobs,
    micro_batch_loss,
    train_loop_per_worker,
)
from rrhf_ray.train.tokens import tokenizer_fingerprint
from rrhf_ray.train.worker import load_causal_lm
from rrhf_ray.types import QueryGroup, read_groups
from tests.helpers import ranked_rows, write_ranked


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def encode(tokenizer, group, max_length):
    """`group` as the trainer encodes it (`train.truncated` keep: every candidate stays)."""
    return Encoder(tokenizer, max_length)(group)


def step(groups, scale):
    """The loop's micro-batch of `groups` on the CPU: no DDP, no autocast."""
    return MicroBatch(list(range(len(groups))), scale, torch.device("cpu"))


def test_encode_masks_the_prompt_and_closes_with_eos(tokenizer):
    g = QueryGroup(query="\n\nHuman: hi\n\nAssistant:", responses=[" Hello there", ""], scores=[1, 0])
    enc = encode(tokenizer, g, max_length=64)
    q = tokenizer(g.query)["input_ids"]
    r = tokenizer(" Hello there", add_special_tokens=False)["input_ids"]
    assert enc.ids[0] == q + r + [tokenizer.eos_token_id]
    assert enc.starts == [len(q), len(q)]
    assert enc.ids[1] == q + [tokenizer.eos_token_id]  # an empty response still scores its EOS


def test_encode_truncates_the_query_from_the_left_once_per_group_keeping_bos(tokenizer):
    """A prompt longer than max_length keeps what the longest response leaves, at least half of
    max_length; a response longer than the other half is cut from the right (no EOS)."""
    g = QueryGroup(query="\n\nHuman: " + "very long question " * 40 + "\n\nAssistant:",
                   responses=[" short answer", " a somewhat longer answer than that"], scores=[0, 1])
    resp = tokenizer(" short answer", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    longer = tokenizer(" a somewhat longer answer than that", add_special_tokens=False)["input_ids"]
    enc = encode(tokenizer, g, max_length=48)  # the longer answer fits whole: the prompt gives way
    assert len(enc.ids[1]) == 48 and enc.responses == [resp, longer + [tokenizer.eos_token_id]]
    assert enc.starts[0] == enc.starts[1] == 48 - len(longer) - 1  # one context for all k
    assert enc.prompt[0] == tokenizer.bos_token_id  # the cut keeps the special prefix
    assert tokenizer.decode(enc.prompt).endswith("\n\nAssistant:")

    assert len(longer) + 1 > 40 // 2
    enc = encode(tokenizer, g, max_length=40)  # it does not: both are cut, at half of max_length
    assert len(enc.prompt) == 20 and enc.prompt[0] == tokenizer.bos_token_id
    assert enc.responses == [resp, longer[:20]]  # cut from the right, no EOS


def test_encode_uses_the_samplers_token_ids_and_closes_only_stopped_replies(tokenizer):
    """Token ids recorded with this tokenizer are trained on as they are (here a tokenization
    `tokenizer(text)` would never produce: one byte-level token per character); a reply cut
    off at the length limit gets no EOS; a different tokenizer's ids are not used."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    q = "\n\nHuman: hi\n\nAssistant:"
    odd = [tokenizer.convert_tokens_to_ids(c) for c in ["Ġ", "H", "i"]]
    assert odd != tokenizer(" Hi", add_special_tokens=False)["input_ids"]
    prompt = tokenizer(q)["input_ids"]
    g = QueryGroup(query=q, responses=[" Hi", " Hi there", " Hey"], scores=[1, 0, 0.5],
                   token_ids=[odd + [tokenizer.eos_token_id], odd, None],
                   finish_reasons=["stop", "length", None], prompt_ids=prompt, tokenizer=fingerprint)
    enc = encode(tokenizer, g, 64)
    assert enc.prompt == prompt
    assert enc.responses[0] == odd + [tokenizer.eos_token_id]  # EOS already there: not doubled
    assert enc.responses[1] == odd  # truncated: no EOS
    hey = tokenizer(" Hey", add_special_tokens=False)["input_ids"]
    assert enc.responses[2] == hey + [tokenizer.eos_token_id]  # text source: tokenized, closed

    dropped = Encoder(tokenizer, 64, truncated="drop")(g)
    assert dropped.responses == [enc.responses[0], enc.responses[2]] and dropped.rewards == [1, 0.5]

    other = encode(tokenizer, g.model_copy(update={"tokenizer": "another"}), 64)
    assert other.responses[0] == tokenizer(" Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_a_reply_stopped_by_an_end_of_turn_token_other_than_eos_gets_no_second_terminator(tiny_model_dir,
                                                                                           tokenizer):
    """vLLM stops on every id of the model's `generation_config.eos_token_id` and keeps the one
    that stopped it (its int `stop_reason`); that token closes the reply, EOS is not added after it.
    A stopped reply whose ids end otherwise (a stop string was cut off) still gets EOS."""
    turn_end = tokenizer.convert_tokens_to_ids("Ċ")  # stands in for an <|eot_id|>
    model = load(tiny_model_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    assert end_token_ids(model) == {tokenizer.eos_token_id, turn_end}
    q = "\n\nHuman: hi\n\nAssistant:"
    hi = tokenizer(" Hi", add_special_tokens=False)["input_ids"]
    g = QueryGroup(query=q, responses=[" Hi", " Hi"], scores=[1, 0], token_ids=[hi + [turn_end], hi],
                   finish_reasons=["stop", "stop"], prompt_ids=tokenizer(q)["input_ids"],
                   tokenizer=tokenizer_fingerprint(tokenizer))
    enc = Encoder(tokenizer, 64, ends=end_token_ids(model))(g)
    assert enc.responses == [hi + [turn_end], hi + [tokenizer.eos_token_id]]
    # Without the model's end-of-turn ids the turn end is taken for text and closed again.
    assert Encoder(tokenizer, 64)(g).responses[0] == hi + [turn_end, tokenizer.eos_token_id]


def test_padding_does_not_change_a_candidates_log_probability(tiny_model_dir, tokenizer):
    """The reference code's bug class: a candidate's p_i must not depend on its batch-mates."""
    model = load(tiny_model_dir).eval()
    g = QueryGroup(query="\n\nHuman: hi\n\nAssistant:",
                   responses=[" Hi!", " A much longer answer with many more tokens in it."], scores=[1, 0])
    enc = encode(tokenizer, g, 64)
    with torch.no_grad():
        for shared in (False, True):
            together, lengths = candidate_logprobs(model, [enc], shared)
            alone, _ = candidate_logprobs(model, [enc], shared, spans=[(0, 0, 1)])
            assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-4)
            assert lengths.tolist() == [len(r) for r in enc.responses]


def gradients(model_dir, tokenizer, groups, micro_batch_queries: int, chunk: int | None = None,
              checkpointing: bool = False, shared: bool = False, budget: int | None = None,
              flex: bool = False):
    """Parameter gradients of one optimizer step over `groups` on one worker, cut into
    micro-batches by the trainer's own `micro_batches` from the config (`micro_batch_queries`,
    or packed to `train.micro_batch_tokens`). `flex`: `train.prefix_attention: flex` (which
    asks for `use_gpu`; the model stays on this CPU all the same)."""
    torch.manual_seed(0)
    kernel = {"prefix_attention": "flex", "use_gpu": True} if flex else {}
    cfg = TrainConfig(queries_per_step=len(groups), micro_batch_queries=micro_batch_queries,
                      candidate_chunk_size=chunk, gradient_checkpointing=checkpointing,
                      micro_batch_tokens=budget, **kernel)
    model = load_causal_lm(str(model_dir), cfg, False)
    model.train()
    enc = [encode(tokenizer, g, 96) for g in groups]
    batches = micro_batches(list(range(len(enc))), cfg.micro_batch_queries,
                            lambda i: enc[i].tokens(shared), cfg.micro_batch_tokens)
    if budget is not None:
        assert len(batches) > 1  # the budget really cut the step
    for idx in batches:
        part = [enc[i] for i in idx]
        micro_batch_loss(model, part, cfg, step(part, 1.0 / len(groups)), shared=shared)
    if shared:  # the kernel the config asked for ran
        assert model.config._attn_implementation == ("rrhf_prefix_flex" if flex else "rrhf_prefix_sdpa")
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(batches)


def test_accumulation_and_chunking_give_the_same_gradient(tiny_model_dir, tokenizer):
    """1 micro-batch of 8 queries (`micro_batch_queries=8`) = 8 micro-batches of 1 accumulated
    (`micro_batch_queries=1`) = 2 × 4 with candidates in chunks of 2 = 1 × 8 with gradient
    checkpointing (activations recomputed in the backward)."""
    groups = [QueryGroup(**r) for r in ranked_rows(8)]
    one, n_one = gradients(tiny_model_dir, tokenizer, groups, 8)
    eight, n_eight = gradients(tiny_model_dir, tokenizer, groups, 1)
    chunked, n_chunked = gradients(tiny_model_dir, tokenizer, groups, 4, chunk=2)
    recomputed, _ = gradients(tiny_model_dir, tokenizer, groups, 8, checkpointing=True)
    assert (n_one, n_eight, n_chunked) == (1, 8, 2)  # the config's accumulation: 1, 8 and 2 steps
    for name, g in one.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(eight[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(chunked[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(recomputed[name], g, rtol=1e-4, atol=1e-6)


def test_prefix_sharing_and_token_budgets_give_the_padded_gradient(tiny_model_dir, tokenizer,
                                                                   flex_backward_on_cpu):
    """The prompt computed once per query, with whole micro-batches, packed to a token budget,
    and with one query's candidates chunked (a budget smaller than the query), with either
    attention kernel (`train.prefix_attention`): every parameter's gradient equals the padded
    way's. Queries of different prompt lengths and different k."""
    rows = ranked_rows(8)
    for i, r in enumerate(rows):  # prompts of different lengths, k from 1 to 4
        r["query"] = "\n\nHuman: " + "tell me more " * (i % 4) + r["query"].removeprefix("\n\nHuman: ")
        keep = 1 + i % 4
        r["responses"], r["scores"] = r["responses"][:keep], r["scores"][:keep]
    groups = [QueryGroup(**r) for r in rows]
    padded, _ = gradients(tiny_model_dir, tokenizer, groups, 8)
    variants = {
        "shared": gradients(tiny_model_dir, tokenizer, groups, 8, shared=True)[0],
        "shared, 8 × 1": gradients(tiny_model_dir, tokenizer, groups, 1, shared=True)[0],
        "shared, budget": gradients(tiny_model_dir, tokenizer, groups, 8, shared=True, budget=120)[0],
        "shared, flex, budget": gradients(tiny_model_dir, tokenizer, groups, 8, shared=True, budget=120,
                                          flex=True)[0],
        "padded, budget": gradients(tiny_model_dir, tokenizer, groups, 8, budget=200)[0],
    }
    # A budget smaller than any query: each query is a micro-batch of its own, its candidates in chunks.
    chunked, n = gradients(tiny_model_dir, tokenizer, groups, 8, shared=True, budget=40)
    assert n == 8
    variants["shared, chunked by budget"] = chunked
    for name, g in padded.items():
        assert g.abs().max() > 0, name
        for variant, grads in variants.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, v=variant: f"{v}: {m}")


def test_plan_steps_covers_every_group_once():
    steps = plan_steps(10, queries_per_step=4, num_workers=3, seed=1)
    assert sorted(i for s in steps for i in s) == list(range(10))
    assert [len(s) for s in steps] == [4, 6]  # a last step of 2 < 3 workers joins the one before
    assert steps == plan_steps(10, 4, 3, seed=1)


def test_each_round_feeds_its_pool_in_a_new_order_and_round_1_keeps_the_seed():
    assert round_train_seed(7, 1) == 7  # a one-off `rrhf-ray train` is a round 1
    seeds = [round_train_seed(7, r) for r in (1, 2, 3, 4)]
    assert len(set(seeds)) == 4 and seeds == [round_train_seed(7, r) for r in (1, 2, 3, 4)]
    orders = [[i for s in plan_steps(32, 8, 1, seed) for i in s] for seed in seeds]
    assert all(sorted(o) == list(range(32)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # the same positions no longer come first every round


def test_lora_checkpoint_is_merged_and_reloads_to_the_same_logits(tiny_model_dir, tokenizer, tmp_path):

    cfg = TrainConfig(lora=LoraConfig(enabled=True, r=4))
    model = load_causal_lm(str(tiny_model_dir), cfg, False)
    with torch.no_grad():  # make the adapter do something: B starts at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([tokenizer("\n\nHuman: hi\n\nAssistant: hello")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = load(tiny_model_dir)(input_ids=ids).logits
    save_hf_checkpoint(model, tokenizer, tmp_path / "ckpt", cfg)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    with torch.no_grad():
        reloaded = load(tmp_path / "ckpt")(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)


def test_single_process_training_writes_a_model_and_resumes(tiny_model_dir, tmp_path):
    data = write_ranked(tmp_path / "ranked.jsonl", 8)
    cfg = TrainConfig(epochs=1, lr=1e-3, queries_per_step=4, micro_batch_queries=2)
    out = tmp_path / "out"
    job = TrainJob(model_path=str(tiny_model_dir), data_paths=[str(data)], output_dir=str(out), train=cfg)
    metrics = train_loop_per_worker({"job": job.model_dump()})
    assert metrics["queries"] == 8 and metrics["step"] == 2
    assert (out / "model.safetensors").exists() and (out / "train_metrics.json").exists()
    assert len(read_groups(data)) == 8
    # Resuming a finished 1-epoch checkpoint with epochs=2 trains exactly one more epoch.
    more = job.model_copy(update={"output_dir": str(tmp_path / "out2"), "resume_from": str(out),
                                  "train": cfg.model_copy(update={"epochs": 2})})
    metrics2 = train_loop_per_worker({"job": more.model_dump()})
    assert metrics2["epoch"] == 2 and metrics2["step"] == 4


# --------------------------------------------------------------------------- train.loss


LOSS_OPTIONS = {  # non-default settings, so that a setting the trainer dropped would show
    "rrhf": {"rank_weight": 0.7, "length_penalty": 0.8, "sft_reduction": "sum"},
    "raft": {"length_penalty": 0.8},
    "pro": {"sft_weight": 0.3, "length_penalty": 0.8},
    "simpo": {"beta": 2.5, "gamma": 0.7, "sft_weight": 0.2, "length_penalty": 0.8},
    "slic": {"margin": 3.0, "sft_weight": 0.4},
    "dpo": {"beta": 0.3, "sft_weight": 0.25},
}


def _loss_groups(tokenizer):
    rows = ranked_rows(4)
    rows[3]["scores"] = [0.5, 0.5, 0.5]  # a query without a strict pair
    enc = [encode(tokenizer, QueryGroup(**r), 96) for r in rows]
    g = torch.Generator().manual_seed(3)
    for e in enc:  # a reference that differs from the policy, so that h ≠ 0
        e.refs = (-torch.rand(len(e.responses), generator=g) * 40).tolist()
    return enc


def _step(model_dir, enc, cfg):
    model = load(model_dir)
    model.train()
    out, _ = micro_batch_loss(model, enc, cfg, step(enc, 1.0))
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(LOSS_OPTIONS))
def test_micro_batch_loss_optimises_the_configured_loss(name, tiny_model_dir, tokenizer):
    """`train.loss` is what the trainer optimises: its loss and every parameter's gradient equal
    those of the loss function of that name, called directly with those settings on the same
    log-probabilities (and, for DPO, the groups' reference log-probabilities); the chunked path
    gives the same gradient."""
    from rrhf_ray.config import LOSS_CONFIGS
    from rrhf_ray.loss import LOSSES

    enc = _loss_groups(tokenizer)
    cfg = TrainConfig(queries_per_step=4, loss={"name": name, **LOSS_OPTIONS[name]})
    assert cfg.loss.name == name and isinstance(cfg.loss, LOSS_CONFIGS[name])
    out, grads = _step(tiny_model_dir, enc, cfg)

    model = load(tiny_model_dir)
    model.train()
    logp, lengths = candidate_logprobs(model, enc, False)
    t = group_tensors(enc, logp, lengths)
    k = max(len(e.responses) for e in enc)
    ref = torch.zeros((len(enc), k))
    for b, e in enumerate(enc):
        ref[b, : len(e.refs)] = torch.tensor(e.refs)
    extra = {"ref_logp_sum": ref} if name == "dpo" else {}
    direct = LOSSES[name](t.logp_sum, t.lengths, t.rewards, t.valid, **LOSS_OPTIONS[name], **extra)
    direct.per_query_loss.sum().backward()
    for field in ("loss", "rank_loss", "sft_loss", "num_pairs"):
        torch.testing.assert_close(getattr(out, field), getattr(direct, field), rtol=1e-5, atol=1e-6)
    assert out.loss.item() > 0
    chunked = _step(tiny_model_dir, enc, cfg.model_copy(update={"candidate_chunk_size": 2}))[1]
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(chunked[n], p.grad, rtol=1e-4, atol=1e-6)


def test_different_losses_give_different_gradients(tiny_model_dir, tokenizer):
    enc = _loss_groups(tokenizer)
    grads = {name: _step(tiny_model_dir, enc, TrainConfig(queries_per_step=4, loss={"name": name}))[1]
             for name in ("rrhf", "raft", "simpo")}
    param = "model.embed_tokens.weight"
    assert not torch.allclose(grads["rrhf"][param], grads["raft"][param])
    assert not torch.allclose(grads["rrhf"][param], grads["simpo"][param])


def test_dpo_without_reference_log_probabilities_is_refused(tiny_model_dir, tokenizer):
    enc = _loss_groups(tokenizer)
    enc[1].refs = None
    with pytest.raises(ValueError, match="reference log-probabilities"):
        _step(tiny_model_dir, enc, TrainConfig(queries_per_step=4, loss={"name": "dpo"}))


def test_shuffled_rewards_permute_within_each_group_seeded():
    from rrhf_ray.train.rrhf import shuffled_rewards

    groups = [QueryGroup(**r) for r in ranked_rows(12)]
    a, b = shuffled_rewards(groups, 0), shuffled_rewards(groups, 0)
    assert [g.scores for g in a] == [g.scores for g in b]  # seeded
    assert [g.scores for g in shuffled_rewards(groups, 1)] != [g.scores for g in a]
    for g, s in zip(groups, a):
        assert sorted(s.scores) == sorted(g.scores) and s.responses == g.responses
    assert sum(g.scores != s.scores for g, s in zip(groups, a)) >= 6  # most orders change


def test_group_tensors_lay_out_groups_of_different_k_as_b_by_k(tokenizer):
    """Query-major flat values → [B, K]: group 0's two candidates, group 1's three; the empty
    slot is invalid and holds zeros."""
    rows = ranked_rows(2)
    rows[0]["responses"], rows[0]["scores"] = rows[0]["responses"][:2], rows[0]["scores"][:2]
    enc = [encode(tokenizer, QueryGroup(**r), 96) for r in rows]
    t = group_tensors(enc, torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.tensor([1, 2, 3, 4, 5]))
    assert t.logp_sum.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert t.lengths.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert t.valid.tolist() == [[True, True, False], [True, True, True]]
    assert t.rewards.tolist() == [rows[0]["scores"] + [0.0], rows[1]["scores"]]


def test_ranking_metrics_load_the_policy_in_model_dtype(tiny_model_dir):
    """The held-out ranking metric (`ranking_task`): auto = float32 on a CPU, bfloat16 loads
    bf16 weights; its accuracy is a share of the 3 strict pairs of each of the 4 queries."""
    from rrhf_ray.train.ranking import ranking_metrics

    groups = [QueryGroup(**r) for r in ranked_rows(4)]
    auto = ranking_metrics(str(tiny_model_dir), groups)
    assert auto == ranking_metrics(str(tiny_model_dir), groups, dtype="float32")
    assert auto["rank_accuracy"] * 12 == pytest.approx(round(auto["rank_accuracy"] * 12))
    bf16 = ranking_metrics(str(tiny_model_dir), groups, dtype="bfloat16")
    assert bf16["best_nll"] != auto["best_nll"] and bf16["best_nll"] == pytest.approx(auto["best_nll"], rel=0.05)


def test_a_long_dataset_response_is_cut_from_the_right_and_the_prompt_kept_whole(tokenizer):
    """HH's `chosen` has no length limit: a 260-token one with max_length 192 is cut to the room
    the prompt leaves (192 − P), without EOS; the prompt (63 tokens, data.max_prompt_tokens of the
    HH workflow) and the short candidates are untouched, for every candidate of the group."""
    words = ("how do I fix my bike chain " * 30).split()
    query = ""
    for n in range(len(words), 0, -1):  # the longest question whose prompt has at most 63 tokens
        query = "\n\nHuman: " + " ".join(words[:n]) + "\n\nAssistant:"
        if len(tokenizer(query)["input_ids"]) <= 63:
            break
    prompt = tokenizer(query)["input_ids"]
    assert 55 <= len(prompt) <= 63
    words = " Oil it, then wipe it and check each link for rust before you ride again."
    long_ids = tokenizer(words * 20, add_special_tokens=False)["input_ids"][:260]
    chosen = tokenizer.decode(long_ids)
    assert len(tokenizer(chosen, add_special_tokens=False)["input_ids"]) >= 260
    short = [" Use oil.", " I cannot help with that."]
    g = QueryGroup(query=query, responses=[chosen, *short], scores=[1.0, 0.5, 0.0],
                   sources=["chosen", "rejected", "policy@0"])
    encoder = Encoder(tokenizer, 192)
    enc = encoder(g)
    assert enc.prompt == prompt  # the whole prompt, for all k candidates
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    assert enc.responses[0] == chosen_ids[: 192 - len(prompt)]  # cut from the right
    assert enc.responses[0][-1] != tokenizer.eos_token_id and len(enc.ids[0]) == 192
    for r, text in zip(enc.responses[1:], short):
        assert r == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoder.cut == 1

    dropped = Encoder(tokenizer, 192, truncated="drop")(g)  # a cut reply is a truncated one
    assert dropped.kept == [1, 2] and dropped.prompt == prompt


def test_a_response_cut_by_the_encoder_loses_its_eos_even_from_the_samplers_ids(tokenizer):
    """A stopped reply whose EOS falls past max_length is cut like any other: no EOS at the end."""
    q = "\n\nHuman: hi\n\nAssistant:"
    prompt = tokenizer(q)["input_ids"]
    ids = tokenizer(" one two three four five six seven eight", add_special_tokens=False)["input_ids"]
    max_length = len(prompt) + len(ids)  # the reply fits, its EOS is one over
    g = QueryGroup(query=q, responses=["x"], scores=[1.0], token_ids=[ids + [tokenizer.eos_token_id]],
                   finish_reasons=["stop"], prompt_ids=prompt, tokenizer=tokenizer_fingerprint(tokenizer))
    enc = Encoder(tokenizer, max_length)(g)
    assert enc.prompt == prompt and enc.responses == [ids]
    assert Encoder(tokenizer, max_length + 1)(g).responses == [ids + [tokenizer.eos_token_id]]
