"""RRHF training throughput and memory: our trainer against the reference code's way.

Baseline ("reference"): a plain loop written here, the reference code's way (GanjinZero/RRHF
train.py with its 1-query-per-device limit): one query per optimizer step, its k candidates as
k right-padded rows `prompt + response_i`, AdamW step after each query.
Ours: the project's trainer (`train_loop_per_worker`), padded (`prefix_sharing=off`, one
query per forward) and prefix-shared (`prefix_sharing=on`: one packed row per query, the prompt
computed once, micro-batches packed to `micro_batch_tokens`). Same model, same token ids (the
pool carries them, as a sampler's pool does), one epoch.

Two workloads:
- short: 64 queries × k = 4, one-line prompts (~20 tokens), responses of 8–60 words;
- hh: Anthropic-HH-shaped, 32 queries × k = 6, 1–4 turn prompts of 100–400 tokens (mean ≈ 200),
  responses of 10–120 tokens (mean ≈ 60), lengths drawn reproducibly.

Each trainer runs in a fresh process: response tokens/s, and peak memory as the RSS high-water
mark of that process minus that of a fresh process that only loads the model and takes one
AdamW step (`peak MB`: the working memory of training, activations and logits; the model,
optimizer state and runtime are the same for every trainer and are printed once as `base MB`).

MFU: the workload's model FLOPs (`flops.py`: what the update has to compute, the prompt once per
query, attention included) over each trainer's training seconds, as a fraction of this machine's
`torch.mm` rate at the model's weight shapes in the trainer's dtype with the same threads (also
measured in a fresh process). The same numerator for every trainer, so a trainer that pads or
computes the prompt k times shows it as a lower fraction.

    .venv/bin/python benchmarks/train_step.py [--workload hh|short|both] [--hidden 512] [--layers 4]

On a GPU (`--device cuda --dtype bfloat16`: bf16 autocast over float32 weights, the trainer's
`use_gpu` / `bf16`, the ceiling a bf16 `torch.mm`), e.g. a ~1B Llama-shaped model built from a
config, no downloads: `--device cuda --dtype bfloat16 --workload hh --hidden 2048 --layers 16
--intermediate 5632 --max-length 640` (its vocabulary is the tiny tokenizer's ~1,000 tokens, so
the LM head is cheaper than a real model's).

The prefix-shared trainers' attention kernel (`train.prefix_attention`, rrhf_ray/train/prefix.py):
`--attention auto` (default: flex on CUDA, sdpa on CPU), `sdpa` (SDPA once over each prompt and
once per response), `flex` (FlexAttention with one block mask per forward, compiled on CUDA; it
has no backward on CPU, so it needs `--device cuda`), or `both`: each prefix-shared trainer once
per kernel, in the same table, to compare them on one GPU (`--workload hh --attention both`).
The first steps of a flex trainer include compiling its kernels (once per new shape until torch
marks the lengths dynamic), and they count in its tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["please", "thank", "you", "sure", "step", "first", "then", "next", "carefully", "water", "heat", "mix", "wait", "check", "done"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- workloads


def make_short(path: Path, tokenizer, n: int = 64, k: int = 4, seed: int = 0) -> Path:
    """n queries × k text candidates of 8–60 words, random rewards (tokenized by the trainer)."""
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


def make_hh(path: Path, tokenizer, n: int = 32, k: int = 6, seed: int = 0) -> Path:
    """n HH-shaped queries × k candidates as token ids (a sampler's pool): prompts of 1–4 turns,
    100–400 tokens (mean ≈ 200); responses 10–120 tokens (mean ≈ 60), EOS-terminated."""
    from rrhf_ray.train.tokens import tokenizer_fingerprint

    rng = random.Random(seed)
    vocab = [i for i in range(3, len(tokenizer)) if i != tokenizer.eos_token_id]
    human = tokenizer("\n\nHuman:", add_special_tokens=False)["input_ids"]
    assistant = tokenizer("\n\nAssistant:", add_special_tokens=False)["input_ids"]
    fingerprint = tokenizer_fingerprint(tokenizer)
    with path.open("w") as f:
        for _ in range(n):
            total = min(400, max(100, round(rng.gauss(200, 70))))
            turns = rng.randint(1, 4)
            body: list[int] = []
            for t in range(turns):
                share = (total - 1) // turns - len(human) - len(assistant)
                body += human + rng.choices(vocab, k=max(4, share // 2)) + assistant
                if t < turns - 1:
                    body += rng.choices(vocab, k=max(4, share - share // 2))
            prompt = [tokenizer.bos_token_id] + body
            responses = [rng.choices(vocab, k=round(rng.triangular(10, 120, 50)) - 1) + [tokenizer.eos_token_id]
                         for _ in range(k)]
            f.write(json.dumps({
                "query": tokenizer.decode(body),
                "responses": [tokenizer.decode(r[:-1]) for r in responses],
                "scores": [rng.uniform(-1, 1) for _ in range(k)],
                "token_ids": responses, "finish_reasons": ["stop"] * k,
                "prompt_ids": prompt, "tokenizer": fingerprint,
            }) + "\n")
    return path


# --------------------------------------------------------------------------- trainers (child)


def reference_loop(model_dir: str, data: str, max_length: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """One query per step, its k candidates as padded rows: (tokens/s, tokens, wall s)."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.loss import rrhf_loss
    from rrhf_ray.train.encoding import Encoder
    from rrhf_ray.train.prefix import PackedQueries, candidate_logprobs_padded
    from rrhf_ray.types import read_groups

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    encoder = Encoder(tok, max_length)
    groups = [encoder(g) for g in read_groups(data)]
    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    _sync(device)
    start, tokens = time.perf_counter(), 0
    for g in groups:
        with autocast:
            logp, lengths = candidate_logprobs_padded(model, PackedQueries([g.prompt], [g.responses]))
        out = rrhf_loss(logp[None].float(), lengths[None].to(logp.device), torch.tensor([g.rewards], device=logp.device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(lengths.sum())
    _sync(device)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall": wall, "seconds": wall, "rss_mb": _rss_mb()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def ceiling_process(model_dir: str, dtype: str, device: str, tokens: int) -> dict:
    """This machine's `torch.mm` FLOP/s at the model's shapes (`flops.matmul_ceiling`)."""
    from flops import Shapes, matmul_ceiling
    from transformers import AutoConfig

    return {"flops_per_s": matmul_ceiling(Shapes.of(AutoConfig.from_pretrained(model_dir)), tokens, dtype, device)}


def base_process(model_dir: str) -> dict:
    """What every trainer holds anyway: the model, its gradients and AdamW state, the runtime."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    _warm_up(model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    return {"rss_mb": _rss_mb()}


def _warm_up(model, optimizer) -> None:
    """One optimizer step on a 2-token input: gradients and optimizer state exist."""
    import torch

    loss = model(input_ids=torch.tensor([[1, 5]])).logits.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours(model_dir: str, data: str, max_length: int, train: dict, device: str = "cpu", dtype: str = "float32") -> dict:
    """The project's trainer, one epoch in this process."""
    from rrhf_ray.config import TrainConfig
    from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker

    gpu = {"use_gpu": True, "bf16": dtype == "bfloat16"} if device.startswith("cuda") else {}
    cfg = TrainConfig(epochs=1, lr=1e-5, warmup_ratio=0.0, log_every=10_000, max_length=max_length,
                      checkpoint_every_epoch=False, **gpu, **train)
    with tempfile.TemporaryDirectory() as out:
        job = TrainJob(model_path=model_dir, data_paths=[data], output_dir=out + "/m", train=cfg)
        start = time.perf_counter()
        metrics = train_loop_per_worker({"job": job.model_dump()})
        wall = time.perf_counter() - start
    # Our wall includes loading the model and saving it once at the end; tokens/s is the
    # trainer's own measure over its steps.
    return {"tokens_per_s": metrics["tokens_per_s"], "tokens": metrics["response_tokens"], "wall": wall,
            "seconds": metrics["response_tokens"] / metrics["tokens_per_s"], "rss_mb": _rss_mb()}


# --------------------------------------------------------------------------- driver (parent)


def trainers(workload: str) -> list[tuple[str, dict | None]]:
    if workload == "short":
        return [
            ("reference: 1 query/step, k padded rows", None),
            ("rrhf-ray padded: 1 query/forward, 8/step", {"prefix_sharing": "off", "queries_per_step": 8,
                                                          "micro_batch_queries": 1}),
            ("rrhf-ray padded: 8 queries/forward", {"prefix_sharing": "off", "queries_per_step": 8,
                                                    "micro_batch_queries": 8}),
            ("rrhf-ray prefix-shared: 8 queries/forward", {"prefix_sharing": "on", "queries_per_step": 8,
                                                           "micro_batch_queries": 8}),
            ("rrhf-ray prefix-shared: ≤ 1024 tokens/forward", {"prefix_sharing": "on", "queries_per_step": 8,
                                                               "micro_batch_tokens": 1024}),
        ]
    return [
        ("reference: 1 query/step, k padded rows", None),
        ("rrhf-ray padded: 1 query/forward, 8/step", {"prefix_sharing": "off", "queries_per_step": 8,
                                                      "micro_batch_queries": 1}),
        ("rrhf-ray prefix-shared: ≤ 1024 tokens/forward", {"prefix_sharing": "on", "queries_per_step": 8,
                                                           "micro_batch_tokens": 1024}),
        # ≈ one HH query (P + ΣR ≈ 590) per forward: the least memory, the same speed on a CPU.
        ("rrhf-ray prefix-shared: ≤ 640 tokens/forward", {"prefix_sharing": "on", "queries_per_step": 8,
                                                          "micro_batch_tokens": 640}),
    ]


def with_attention(listed: list[tuple[str, dict | None]], attention: str) -> list[tuple[str, dict | None]]:
    """The prefix-shared trainers of `listed` with `train.prefix_attention` = `attention`
    (`both`: once with sdpa, then once with flex); the others as they are."""
    kernels = ["sdpa", "flex"] if attention == "both" else [attention]
    out = []
    for name, train in listed:
        if train is None or train.get("prefix_sharing") != "on":
            out.append((name, train))
            continue
        for kernel in kernels:
            label = name if attention == "auto" else f"{name} [{kernel}]"
            out.append((label, {**train, "prefix_attention": kernel}))
    return out


def run_child(args: argparse.Namespace, model: Path, data: Path | None, train: dict | str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"model": str(model), "data": str(data),
                                                            "max_length": args.max_length, "train": train,
                                                            "device": args.device, "dtype": args.dtype})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    import torch

    s = json.loads(spec)
    torch.manual_seed(0)
    device, dtype = s["device"], s["dtype"]
    if s["train"] == "base":
        result = base_process(s["model"])
    elif s["train"] == "ceiling":
        result = ceiling_process(s["model"], dtype, device, s["max_length"])
    elif s["train"] is None:
        result = reference_loop(s["model"], s["data"], s["max_length"], device, dtype)
    else:
        result = ours(s["model"], s["data"], s["max_length"], s["train"], device, dtype)
    print(json.dumps(result))


def workload_flops(model: Path, data: Path, max_length: int) -> tuple[float, int]:
    """(model FLOPs of one epoch over `data`, the tokens it has to compute: Σ P + ΣR), from the
    groups as the trainers encode them."""
    from flops import Shapes, query_flops
    from transformers import AutoConfig, AutoTokenizer

    from rrhf_ray.train.encoding import Encoder
    from rrhf_ray.types import read_groups

    shapes = Shapes.of(AutoConfig.from_pretrained(model))
    encoder = Encoder(AutoTokenizer.from_pretrained(model), max_length)
    groups = [encoder(g) for g in read_groups(data)]
    total = sum(query_flops(shapes, len(g.prompt), [len(r) for r in g.responses]) for g in groups)
    return total, sum(len(g.prompt) + sum(len(r) for r in g.responses) for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["hh", "short", "both"], default="both")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 × hidden)")
    parser.add_argument("--max-length", type=int, default=640, help="query + response tokens")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the trainers' compute dtype (bfloat16: autocast over float32 weights) and the ceiling's")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flex", "both"], default="auto",
                        help="the prefix-shared trainers' attention kernel (train.prefix_attention); "
                             "both = each of them with sdpa and with flex")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.attention in ("flex", "both") and not args.device.startswith("cuda"):
        parser.error(f"--attention {args.attention} needs --device cuda: FlexAttention has no backward on CPU")

    import torch
    from transformers import AutoTokenizer

    from rrhf_ray.demo.tiny import DEFAULT_CORPUS, build_tiny_llama

    workloads = ["short", "hh"] if args.workload == "both" else [args.workload]
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = DEFAULT_CORPUS + [" ".join(WORDS)] * 4
        model = build_tiny_llama(tmp / "model", texts, hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.hidden // 64, intermediate_size=args.intermediate,
                                 max_position_embeddings=1024)
        tok = AutoTokenizer.from_pretrained(model)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                       .from_pretrained(model).parameters())
        base = run_child(args, model, None, "base")["rss_mb"]
        ceiling = run_child(args, model, None, "ceiling")["flops_per_s"]
        print(f"matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s (torch.mm at the model's shapes, {args.dtype}, "
              f"{args.device}, {torch.get_num_threads()} threads)")
        for workload in workloads:
            make = make_hh if workload == "hh" else make_short
            data = make(tmp / f"{workload}.jsonl", tok)
            flops, needed = workload_flops(model, data, args.max_length)
            results = [(name, run_child(args, model, data, train))
                       for name, train in with_attention(trainers(workload), args.attention)]
            for _, r in results:
                r["peak_mb"] = r["rss_mb"] - base
                r["mfu"] = flops / r["seconds"] / ceiling
            ref = results[0][1]
            print(f"\nworkload {workload}: Llama {n_params / 1e6:.1f}M params (hidden {args.hidden} × "
                  f"{args.layers} layers), {args.dtype}, {args.device}, {torch.get_num_threads()} threads, 1 epoch; "
                  f"base {base:.0f} MB (model + AdamW + runtime); {flops / 1e12:.2f} TFLOP of model work "
                  f"({needed:,} tokens to compute)")
            w = max(48, *(len(name) for name, _ in results))
            print(f"{'trainer':<{w}} {'resp tok/s':>10} {'× ref':>6} {'MFU':>5} {'peak MB':>8} {'× ref':>6} {'wall s':>7}")
            for name, r in results:
                print(f"{name:<{w}} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / ref['tokens_per_s']:>6.2f} "
                      f"{r['mfu']:>5.2f} {r['peak_mb']:>8.0f} {r['peak_mb'] / ref['peak_mb']:>6.2f} {r['wall']:>7.1f}")
            best = results[-1][1]  # the setting docs/benchmarks.md quotes
            summary[workload] = (best["tokens_per_s"] / ref["tokens_per_s"], best["peak_mb"] / ref["peak_mb"],
                                 best["mfu"], ref["mfu"])
    if "hh" in summary:
        speed, memory, mfu, ref_mfu = summary["hh"]
        print(f"\nhh-shaped speedup vs reference: {speed:.2f}× (peak memory {memory:.2f}× the reference's); "
              f"MFU {mfu:.2f} of the matmul ceiling (the reference loop: {ref_mfu:.2f})")


if __name__ == "__main__":
    main()
