"""RRHF training throughput: our batched trainer against the reference code's way.

Baseline ("reference"): a plain loop written here, the reference code's way (GanjinZero/RRHF
train.py with its 1-query-per-device limit): one query per optimizer step, its k candidates
padded to the longest and run as one batch, AdamW step after each query.
Ours: the project's trainer (`train_loop_per_worker`), `micro_batch_queries` queries (all their
candidates) per forward, `queries_per_step` queries per optimizer step. Same model, same data,
one epoch, one process, in one run. Prints response tokens/s of each and the ratio.

    .venv/bin/python benchmarks/train_step.py [--queries 64] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from rrhf_ray.config import TrainConfig
from rrhf_ray.demo.tiny import DEFAULT_CORPUS, build_tiny_llama
from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker

WORDS = ["please", "thank", "you", "sure", "step", "first", "then", "next", "carefully", "water", "heat", "mix", "wait", "check", "done"]


def make_pool(path: Path, n: int, k: int, seed: int) -> Path:
    """n queries × k candidates of varied length (8–60 words), random rewards."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            responses = [" " + " ".join(rng.choices(WORDS, k=rng.randint(8, 60))) for _ in range(k)]
            f.write(json.dumps({
                "query": f"\n\nHuman: question {i}: how do I do task {i % 7}?\n\nAssistant:",
                "responses": responses,
                "scores": [rng.uniform(-1, 1) for _ in range(k)],
            }) + "\n")
    return path


def reference_loop(model_dir: Path, data: Path, max_length: int = 192) -> tuple[float, float, float]:
    """One query per step, k candidates padded into one batch: (tokens/s, tokens, wall s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.loss import rrhf_loss
    from rrhf_ray.train.rrhf import candidate_logprobs, encode_group
    from rrhf_ray.types import read_groups

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    groups = [encode_group(tok, g, max_length) for g in read_groups(data)]
    start, tokens = time.perf_counter(), 0
    for g in groups:
        logp, lengths = candidate_logprobs(model, list(zip(g.ids, g.starts)), tok.pad_token_id,
                                           torch.device("cpu"))
        out = rrhf_loss(logp[None], lengths[None], torch.tensor([g.rewards]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(lengths.sum())
    wall = time.perf_counter() - start
    return tokens / wall, float(tokens), wall


def run(model: Path, data: Path, out: Path, **train) -> tuple[float, float, float]:
    cfg = TrainConfig(epochs=1, lr=1e-5, warmup_ratio=0.0, log_every=10_000, max_length=192, **train)
    job = TrainJob(model_path=str(model), data_paths=[str(data)], output_dir=str(out), train=cfg)
    start = time.perf_counter()
    metrics = train_loop_per_worker({"job": job.model_dump()})
    wall = time.perf_counter() - start
    return metrics["tokens_per_s"], metrics["response_tokens"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8, help="our queries per forward")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = DEFAULT_CORPUS + [" ".join(WORDS)] * 4
        model = build_tiny_llama(tmp / "model", texts, hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.hidden // 64)
        data = make_pool(tmp / "pool.jsonl", args.queries, args.k, seed=0)
        rows = [
            (f"rrhf-ray: 1 query/forward, {args.micro_batch}/step",
             {"queries_per_step": args.micro_batch, "micro_batch_queries": 1}),
            (f"rrhf-ray: 2 queries/forward, {args.micro_batch}/step (length-sorted)",
             {"queries_per_step": args.micro_batch, "micro_batch_queries": 2}),
            (f"rrhf-ray: {args.micro_batch} queries/forward",
             {"queries_per_step": args.micro_batch, "micro_batch_queries": args.micro_batch}),
            (f"rrhf-ray: {args.micro_batch} q/forward, chunks of {args.k}",
             {"queries_per_step": args.micro_batch, "micro_batch_queries": args.micro_batch,
                  "candidate_chunk_size": args.k}),
        ]
        results = [("reference: 1 query/step, k padded", *reference_loop(model, data))]
        for name, kw in rows:
            tps, tokens, wall = run(model, data, tmp / "out", **kw)
            results.append((name, tps, tokens, wall))

    base = results[0][1]
    print(f"\nRRHF train step, {args.queries} queries × k={args.k}, Llama hidden {args.hidden} × "
          f"{args.layers} layers, fp32, {torch.get_num_threads()} threads, 1 epoch")
    print(f"{'trainer':<52} {'resp tok/s':>10} {'tokens':>8} {'wall s':>7} {'× ref':>6}")
    for name, tps, tokens, wall in results:
        print(f"{name:<52} {tps:>10.0f} {tokens:>8.0f} {wall:>7.1f} {tps / base:>6.2f}")


if __name__ == "__main__":
    main()
