"""SFT without Ray: the prompt carries no loss, the loss is RRHF's response log-probability,
and fine-tuning lowers the held-out NLL of the responses."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_ray.config import TrainConfig
from rrhf_ray.data.pairs import SFTPair, read_sft_pairs
from rrhf_ray.train.prefix import (
    PackedQueries,
    candidate_logprobs_padded,
    pack_rows,
    packed_nll_sum,
)
from rrhf_ray.train.sft import SFTJob, encode_pair, heldout_nll, nll_sum, sft_loop_per_worker
from rrhf_ray.train.tokens import IGNORE, Batch, collate, encode
from rrhf_ray.types import DataError
from tests.stage_data import preference_rows, sft_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_mask_the_prompt_and_padding_and_keep_the_eos(tokenizer):
    short = SFTPair("\n\nHuman: hi\n\nAssistant:", " Hello")
    long = SFTPair("\n\nHuman: how are you today?\n\nAssistant:", " Very well, thank you for asking!")
    enc = [encode_pair(tokenizer, p, 64) for p in (short, long)]
    batch = collate(enc, tokenizer.pad_token_id)
    q = tokenizer(short.query)["input_ids"]
    r = tokenizer(short.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = batch.labels()[0].tolist()
    width = batch.input_ids.shape[1]
    assert batch.input_ids[0, : len(q) + len(r)].tolist() == q + r
    assert labels == [IGNORE] * len(q) + r + [IGNORE] * (width - len(q) - len(r))
    assert batch.attention_mask[0].tolist() == [1] * (len(q) + len(r)) + [0] * (width - len(q) - len(r))
    assert (batch.labels()[1] != IGNORE).sum() == len(enc[1][0]) - enc[1][1]  # no padding in row 1


def test_the_loss_is_the_response_nll_only(tiny_model_dir, tokenizer):
    """nll_sum equals −Σ log π over response + EOS as RRHF's scorer computes it (an independent
    masking path), and no prompt position enters the sum."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [SFTPair(r["query"], r["response"]) for r in sft_rows(3)]
    enc = [encode_pair(tokenizer, p, 96) for p in pairs]
    cpu = torch.device("cpu")
    with torch.no_grad():
        loss, tokens = nll_sum(model, collate(enc, tokenizer.pad_token_id), cpu)
        logp, lengths = candidate_logprobs_padded(
            model, PackedQueries([ids[:s] for ids, s in enc], [[ids[s:]] for ids, s in enc]))
    assert tokens == int(lengths.sum()) == sum(len(ids) - s for ids, s in enc)
    assert loss.item() == pytest.approx(-logp.sum().item(), rel=1e-5)
    # Labelling the prompt too adds its tokens to the sum: the masking above is what removed them.
    batch = collate(enc, tokenizer.pad_token_id)
    full = Batch(batch.input_ids, batch.attention_mask, batch.attention_mask.bool())
    with torch.no_grad():
        loss_all, tokens_all = nll_sum(model, full, cpu)
    assert tokens_all == sum(len(ids) - 1 for ids, _ in enc) > tokens
    assert loss_all.item() > loss.item()


def test_sft_lowers_the_heldout_nll_of_the_responses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(24))
    held_file = write_jsonl(tmp_path / "held.jsonl", sft_rows(8, held_out=True))
    held = read_sft_pairs(str(held_file))
    before = heldout_nll(tiny_model_dir, held)
    cfg = TrainConfig(epochs=2, lr=2e-3, queries_per_step=8, micro_batch_queries=4, warmup_ratio=0.0)
    job = SFTJob(model_path=str(tiny_model_dir), data_path=str(data), output_dir=str(tmp_path / "out"),
                 train=cfg, eval_path=str(held_file))
    metrics = sft_loop_per_worker({"job": job.model_dump()})
    after = heldout_nll(tmp_path / "out", held)
    assert after < before - 1.0, (before, after)
    assert metrics["eval_nll"] == pytest.approx(after, rel=1e-4)
    assert metrics["step"] == 6 and metrics["pairs"] == 24
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["epoch"] == 2


def test_sft_takes_the_chosen_response_of_hh_layout_rows(tmp_path):
    rows = [{"prompt": r["query"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in preference_rows(3)]
    pairs = read_sft_pairs(str(write_jsonl(tmp_path / "rm_static.jsonl", rows)))
    assert [(p.query, p.response) for p in pairs] == [(r["prompt"], r["chosen"]) for r in rows]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"query": "\n\nHuman: hi\n\nAssistant:"}, "line 2: missing field 'response'"),
        ({"query": "\n\nHuman: hi\n\nAssistant:", "response": "  "}, "line 2: field 'response' is empty"),
        ({"query": "", "response": " Hello"}, "line 2: field 'query' is empty"),
        ({"query": "q", "response": 3}, "line 2: field 'response' must be a string"),
    ],
)
def test_malformed_sft_rows_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [sft_rows(1)[0], row])
    with pytest.raises(DataError, match=message) as err:
        read_sft_pairs(str(path))
    assert str(path) in str(err.value)


def test_sft_stage_trains_once_then_reuses_its_output(tiny_model_dir, tmp_path):
    from rrhf_ray.config import RunConfig
    from rrhf_ray.train.sft import run_sft_stage

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    run = RunConfig.model_validate({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": str(data)}, "reward": {"rule": "builtin:demo"},
        "sft": {"data": str(data), "eval_fraction": 0.25,
                "train": {"epochs": 1, "queries_per_step": 3, "micro_batch_queries": 3}},
    })
    assert run.sft.train.lr == 2e-5 and run.sft.train.max_length == 512  # SFT defaults kept
    out = run_sft_stage(run, tmp_path / "run")
    assert out == tmp_path / "run" / "sft"
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["pairs"] == 6 and "eval_nll" in metrics  # 2 of 8 held out
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_sft_stage(run, tmp_path / "run") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_one_batch_equals_single_examples_in_gradient(tiny_model_dir, tokenizer):
    """The SFT step's loss is Σ NLL / step tokens: a batch of 4 padded pairs gives the same
    gradient as the 4 pairs one by one (so accumulation and DDP splits do not change a step)."""
    pairs = [SFTPair(r["query"], r["response"]) for r in sft_rows(4)]
    encoded = [encode_pair(tokenizer, p, 96) for p in pairs]
    tokens = sum(len(ids) - start for ids, start in encoded)

    def grads(batches):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        for batch in batches:
            loss, _ = nll_sum(model, collate(batch, tokenizer.pad_token_id), torch.device("cpu"))
            (loss / tokens).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    together = grads([encoded])
    alone = grads([[e] for e in encoded])
    for name, g in together.items():
        torch.testing.assert_close(alone[name], g, rtol=1e-4, atol=1e-6)


def test_model_dtype_sets_the_weights_of_the_heldout_nll_model(tiny_model_dir):
    """`model.dtype` reaches the evaluation's loader: auto is float32 on a CPU (the same number
    as float32), bfloat16 loads bf16 weights (a slightly different number)."""
    from rrhf_ray.train.worker import inference_dtype

    assert inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert inference_dtype("float16", "cpu") == torch.float16
    held = [SFTPair(r["query"], r["response"]) for r in sft_rows(4, held_out=True)]
    auto = heldout_nll(tiny_model_dir, held)
    assert auto == heldout_nll(tiny_model_dir, held, dtype="float32")
    bf16 = heldout_nll(tiny_model_dir, held, dtype="bfloat16")
    assert bf16 != auto and bf16 == pytest.approx(auto, rel=0.05)


def test_a_reply_cut_off_at_the_length_limit_is_scored_without_an_eos(tiny_model_dir, tokenizer):
    """The judge's perplexity of a greedy reply that hit max_new_tokens: the reply's own tokens,
    no terminator its policy never emitted; a reply that ended keeps its EOS."""
    q, r = "\n\nHuman: hi\n\nAssistant:", " Hello there, how are"
    ids, start = encode(tokenizer, q, r, 64, closed=False)
    reply = tokenizer(r, add_special_tokens=False)["input_ids"]
    assert ids[start:] == reply and ids[:start] == tokenizer(q)["input_ids"]
    assert encode(tokenizer, q, r, 64)[0][start:] == reply + [tokenizer.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    closed = encode(tokenizer, q, r, 64)
    with torch.no_grad():
        total, n = nll_sum(model, collate([(ids, start)], tokenizer.pad_token_id), torch.device("cpu"))
        with_eos, m = nll_sum(model, collate([closed], tokenizer.pad_token_id), torch.device("cpu"))
    assert (n, m) == (len(reply), len(reply) + 1)
    assert heldout_nll(tiny_model_dir, [(q, r, False)]) == pytest.approx(float(total) / n, rel=1e-5)
    assert heldout_nll(tiny_model_dir, [(q, r)]) == pytest.approx(float(with_eos) / m, rel=1e-5)
    assert float(with_eos) / m != pytest.approx(float(total) / n, rel=1e-5)


def test_rows_are_packed_first_fit_longest_first_within_the_capacity():
    rows = pack_rows([5, 9, 3, 7, 2, 12], capacity=12)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths = [5, 9, 3, 7, 2, 12]
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert rows == [[5], [1, 2], [3, 0], [4]]  # 12 | 9 + 3 | 7 + 5 | 2


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_sft_equals_padded_rows_in_loss_and_every_gradient(tiny_model_dir, tokenizer, attention, request):
    """Pairs packed into rows of at most 160 tokens (two per row, each attending only to itself,
    positions from 0): the summed response NLL and every parameter's gradient equal one padded
    row per pair, with either attention kernel (flex on CPU: FlexAttention's eager reference)."""
    if attention == "flex":
        request.getfixturevalue("flex_backward_on_cpu")
    pairs = [SFTPair(r["query"], r["response"]) for r in sft_rows(7)]
    enc = [encode_pair(tokenizer, p, 160) for p in pairs]
    assert len(pack_rows([len(ids) for ids, _ in enc], 160)) < len(enc)  # some rows hold several pairs
    results = {}
    for name in ("padded", "packed"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
        if name == "padded":
            loss, n = nll_sum(model, collate(enc, tokenizer.pad_token_id), torch.device("cpu"))
        else:
            loss, n = packed_nll_sum(model, enc, 160, attention)
        loss.backward()
        results[name] = (float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters()})
    (l0, n0, g0), (l1, n1, g1) = results["padded"], results["packed"]
    assert n1 == n0 == sum(len(ids) - start for ids, start in enc)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for k in g0:
        # The floor scales with the tensor's largest entry: an entry summed over many tokens (an
        # embedding row) carries a few float32 ulps of the largest ones (the sums run in another order).
        floor = 1e-6 * max(1.0, float(g0[k].abs().max()))
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=floor, msg=k)


def test_sft_with_packing_trains_to_the_same_heldout_nll(tiny_model_dir, tmp_path):
    """The whole fit, packed (`train.packing: on`) and padded: the same steps, the same held-out
    NLL to float rounding."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    held_file = write_jsonl(tmp_path / "held.jsonl", sft_rows(4, held_out=True))
    nll = {}
    for packing in ("off", "on"):
        cfg = TrainConfig(epochs=1, lr=2e-3, queries_per_step=8, micro_batch_queries=8, warmup_ratio=0.0,
                          max_length=192, packing=packing)
        job = SFTJob(model_path=str(tiny_model_dir), data_path=str(data), output_dir=str(tmp_path / packing),
                     train=cfg, eval_path=str(held_file))
        nll[packing] = sft_loop_per_worker({"job": job.model_dump()})["eval_nll"]
    assert nll["on"] == pytest.approx(nll["off"], rel=1e-4)
