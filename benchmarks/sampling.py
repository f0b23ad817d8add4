"""Candidate tokens/s: the SamplerPool (vLLM replicas on Ray) against HF `generate` with sampling.

Both draw n candidates for the same prompts with the same lengths, temperature 1 and top-k off
(HF applies top_k=50 unless told `top_k=0`), on the same bf16 Llama built locally with
`rrhf_ray.demo.tiny.build_tiny_llama` (default: hidden 512, 8 layers, 8 heads, ~30M parameters).
Engine start-up is reported apart; the timed runs follow one warm-up each.

    .venv/bin/python benchmarks/sampling.py                 # eager engine
    .venv/bin/python benchmarks/sampling.py --compile       # torch.compile'd engine (slow first start)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_generate(model_dir: Path, prompts: list[str], n: int, max_new_tokens: int) -> tuple[int, float]:
    """(candidate tokens, seconds) of HF `generate`, all prompts × n in one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        tokens = 0
        for row in new.tolist():  # count up to and including the EOS, as vLLM does
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        return tokens

    torch.manual_seed(0)
    run()  # warm-up
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def pool_generate(model_dir: Path, prompts: list[str], args: argparse.Namespace) -> tuple[int, float, float]:
    """(candidate tokens, seconds, start-up seconds) of a SamplerPool."""
    import ray

    from rrhf_ray.actors.sampler import SamplerPool, count_tokens
    from rrhf_ray.config import SamplingConfig

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    config = SamplingConfig(num_replicas=args.replicas, n=args.n, temperature=1.0, top_k=-1,
                            max_new_tokens=args.max_new_tokens, stop=[], dtype="bfloat16",
                            enforce_eager=not args.compile, max_model_len=512,
                            cpus_per_replica=max(1, cpus // args.replicas), return_logprobs=False)
    start = time.perf_counter()
    pool = SamplerPool(str(model_dir), config)
    ray.get(pool.version_refs())
    startup = time.perf_counter() - start
    ray.get(pool.sample_refs(prompts, progress=False))  # warm-up
    start = time.perf_counter()
    groups = ray.get(pool.sample_refs(prompts, progress=False))
    seconds = time.perf_counter() - start
    pool.shutdown()
    ray.shutdown()
    return count_tokens(groups), seconds, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="enforce_eager off (torch.compile)")
    args = parser.parse_args()

    from rrhf_ray.demo.tiny import DEFAULT_CORPUS, build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "llama", hidden_size=args.hidden,
                                     num_layers=args.layers, num_heads=args.heads)
        import torch
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        prompts = [DEFAULT_CORPUS[i % 5].split("\n\nAssistant:")[0] + f" ({i})\n\nAssistant:"
                   for i in range(args.prompts)]
        torch.set_num_threads(os.cpu_count() or 2)
        hf_tokens, hf_s = hf_generate(model_dir, prompts, args.n, args.max_new_tokens)
        pool_tokens, pool_s, startup = pool_generate(model_dir, prompts, args)

    hf_rate, pool_rate = hf_tokens / hf_s, pool_tokens / pool_s
    mode = "compiled" if args.compile else "eager"
    print(f"\nLlama {params / 1e6:.1f}M params, bf16; {args.prompts} prompts × n={args.n} × "
          f"≤{args.max_new_tokens} new tokens; {os.cpu_count()} CPUs")
    print(f"{'sampler':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'HF generate (top_k=0)':<34} {hf_tokens:>7} {hf_s:>8.2f} {hf_rate:>9.1f}")
    print(f"{f'SamplerPool ×{args.replicas} ({mode})':<34} {pool_tokens:>7} {pool_s:>8.2f} {pool_rate:>9.1f}")
    print(f"ratio SamplerPool / HF: {pool_rate / hf_rate:.2f}×   (engine start-up {startup:.0f} s, not timed)")


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    main()
