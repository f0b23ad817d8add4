"""The trainer without Ray: tokenisation, padding, accumulation and chunking invariances,
and checkpoints that reload to the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_ray.config import LoraConfig, TrainConfig
from rrhf_ray.train.core import load_causal_lm, plan_steps, save_hf_checkpoint
from rrhf_ray.train.rrhf import (
    TrainJob,
    candidate_logprobs,
    encode_group,
    micro_batch_loss,
    train_loop_per_worker,
)
from rrhf_ray.types import QueryGroup, read_groups
from tests.helpers import ranked_rows, write_ranked


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_encode_masks_the_prompt_and_closes_with_eos(tokenizer):
    g = QueryGroup(query="\n\nHuman: hi\n\nAssistant:", responses=[" Hello there", ""], scores=[1, 0])
    enc = encode_group(tokenizer, g, max_length=64)
    q = tokenizer(g.query)["input_ids"]
    r = tokenizer(" Hello there", add_special_tokens=False)["input_ids"]
    assert enc.ids[0] == q + r + [tokenizer.eos_token_id]
    assert enc.starts == [len(q), len(q)]
    assert enc.ids[1] == q + [tokenizer.eos_token_id]  # an empty response still scores its EOS


def test_encode_truncates_the_query_from_the_left(tokenizer):
    g = QueryGroup(query="\n\nHuman: " + "very long question " * 40 + "\n\nAssistant:",
                   responses=[" short answer"], scores=[0])
    enc = encode_group(tokenizer, g, max_length=24)
    resp = tokenizer(" short answer", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(enc.ids[0]) == 24
    assert enc.ids[0][-len(resp):] == resp
    assert enc.starts[0] == 24 - len(resp)
    assert tokenizer.decode(enc.ids[0][: enc.starts[0]]).endswith("\n\nAssistant:")


def test_padding_does_not_change_a_candidates_log_probability(tiny_model_dir, tokenizer):
    """The reference code's bug class: a candidate's p_i must not depend on its batch-mates."""
    model = load(tiny_model_dir).eval()
    g = QueryGroup(query="\n\nHuman: hi\n\nAssistant:",
                   responses=[" Hi!", " A much longer answer with many more tokens in it."], scores=[1, 0])
    enc = encode_group(tokenizer, g, 64)
    pairs = list(zip(enc.ids, enc.starts))
    with torch.no_grad():
        together, lengths = candidate_logprobs(model, pairs, tokenizer.pad_token_id, torch.device("cpu"))
        alone, _ = candidate_logprobs(model, pairs[:1], tokenizer.pad_token_id, torch.device("cpu"))
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-4)
    assert lengths.tolist() == [len(ids) - s for ids, s in pairs]


def gradients(model_dir, tokenizer, groups, split: list[int], chunk: int | None, checkpointing: bool = False):

    torch.manual_seed(0)
    cfg = TrainConfig(queries_per_step=len(groups), candidate_chunk_size=chunk,
                      gradient_checkpointing=checkpointing)
    model = load_causal_lm(str(model_dir), cfg, False)
    model.train()
    enc = [encode_group(tokenizer, g, 96) for g in groups]
    start = 0
    for size in split:
        micro_batch_loss(model, enc[start : start + size], cfg, tokenizer.pad_token_id,
                         torch.device("cpu"), scale=1.0 / len(groups))
        start += size
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_and_chunking_give_the_same_gradient(tiny_model_dir, tokenizer):
    """1 micro-batch of 8 queries = 8 micro-batches of 1 = 2 × 4 with candidates in chunks of 2
    = 1 × 8 with gradient checkpointing (activations recomputed in the backward)."""
    groups = [QueryGroup(**r) for r in ranked_rows(8)]
    one = gradients(tiny_model_dir, tokenizer, groups, [8], None)
    eight = gradients(tiny_model_dir, tokenizer, groups, [1] * 8, None)
    chunked = gradients(tiny_model_dir, tokenizer, groups, [4, 4], 2)
    recomputed = gradients(tiny_model_dir, tokenizer, groups, [8], None, checkpointing=True)
    for name, g in one.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(eight[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(chunked[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(recomputed[name], g, rtol=1e-4, atol=1e-6)


def test_plan_steps_covers_every_group_once():
    steps = plan_steps(10, queries_per_step=4, num_workers=3, seed=1)
    assert sorted(i for s in steps for i in s) == list(range(10))
    assert [len(s) for s in steps] == [4, 6]  # a last step of 2 < 3 workers joins the one before
    assert steps == plan_steps(10, 4, 3, seed=1)


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
