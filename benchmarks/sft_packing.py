"""SFT update throughput, packed against padded rows, on the demo's SFT stage.

Baseline ("padded"): one right-padded row per (query, response) pair, logits at every position
(`rrhf_ray.train.sft.nll_sum`, the SFT stage with `packing: off`). Packed: the pairs of a
micro-batch in rows of up to `max_length` tokens, each attending only to itself, logits only where
a response token is predicted (`rrhf_ray.train.prefix.packed_nll_sum`, `packing: on`). The demo's
model (builtin:demo-tiny-llama) and its SFT pairs (builtin:demo-sft) at the demo's settings
(micro-batches of 32 pairs, max_length 128), forward + backward + AdamW step, float32; the two
interleaved step by step in one process (so both see the same machine), after one warm-up step
each. Prints response tokens/s of each, the ratio, and the padding share of the padded rows.

    .venv/bin/python benchmarks/sft_packing.py [--steps 40] [--micro-batch 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.data.pairs import SFTPair
    from rrhf_ray.demo.task import build_demo_model, sft_pairs
    from rrhf_ray.train.prefix import packed_nll_sum
    from rrhf_ray.train.sft import encode_pair, nll_sum
    from rrhf_ray.train.tokens import collate

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_model(Path(tmp) / "model")
        tok = AutoTokenizer.from_pretrained(model_dir)
        pairs = [SFTPair(p["query"], p["response"]) for p in sft_pairs()]
        enc = [encode_pair(tok, p, args.max_length) for p in pairs]
        models = {name: AutoModelForCausalLM.from_pretrained(model_dir).train() for name in ("padded", "packed")}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def step(name: str, batch: list[tuple[list[int], int]]) -> tuple[float, int]:
        model = models[name]
        start = time.perf_counter()
        if name == "padded":
            loss, n = nll_sum(model, collate(batch, tok.pad_token_id), torch.device("cpu"))
        else:
            loss, n = packed_nll_sum(model, batch, args.max_length)
        (loss / n).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, n

    seconds = {"padded": 0.0, "packed": 0.0}
    tokens = dict.fromkeys(seconds, 0)
    real = padded_width = 0
    for s in range(args.steps + 1):
        batch = enc[s * args.micro_batch : (s + 1) * args.micro_batch]
        for name in ("padded", "packed") if s % 2 == 0 else ("packed", "padded"):
            t, n = step(name, batch)
            if s:  # step 0 warms up both
                seconds[name] += t
                tokens[name] += n
        if s:
            real += sum(len(ids) for ids, _ in batch)
            padded_width += len(batch) * max(len(ids) for ids, _ in batch)
    rate = {name: tokens[name] / seconds[name] for name in seconds}
    print(f"demo SFT update, {args.steps} micro-batches of {args.micro_batch} pairs, max_length "
          f"{args.max_length}, {torch.get_num_threads()} threads, float32; padded rows are "
          f"{1 - real / padded_width:.0%} padding")
    for name in ("padded", "packed"):
        print(f"{name:<8} {rate[name]:>8.0f} response tok/s  {seconds[name]:>6.1f} s")
    print(f"packed vs padded: {rate['packed'] / rate['padded']:.2f}×")


if __name__ == "__main__":
    main()
