"""The trainer's optimizer step: PyTorch's fused AdamW (what `rrhf_ray.train.loop.Optimizer`
builds where it applies) against AdamW's default per-tensor loop (the baseline), interleaved
step by step in one process on the same gradients, for two models' parameters: the demo's
(builtin:demo-tiny-llama, a 2-layer Llama of hidden 128) and the 11M-parameter Llama of
`train_step.py` (hidden 512 × 4 layers). float32, this machine's threads. Prints milliseconds
per step of each and the ratio, and the largest difference between the two updates' weights
(the same update up to float rounding).

    .venv/bin/python benchmarks/optimizer.py [--steps 50]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from rrhf_ray.config import TrainConfig
    from rrhf_ray.demo.task import build_demo_model
    from rrhf_ray.demo.tiny import build_tiny_llama
    from rrhf_ray.train.loop import Optimizer

    cfg = TrainConfig(lr=1e-4, warmup_ratio=0.0, lr_scheduler="constant")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"demo (hidden 128 × 2 layers)": build_demo_model(Path(tmp) / "demo"),
                "11M Llama (hidden 512 × 4 layers)": build_tiny_llama(
                    Path(tmp) / "11m", hidden_size=512, num_layers=4, num_heads=8, seed=0)}
        models = {name: AutoModelForCausalLM.from_pretrained(d) for name, d in dirs.items()}
    print(f"AdamW step, float32, {torch.get_num_threads()} threads, {args.steps} steps each, interleaved")
    for name, model in models.items():
        loop_model = copy.deepcopy(model)
        fused = Optimizer.build(model, cfg, total_steps=args.steps).optimizer
        assert fused.defaults["fused"] is True
        loop = torch.optim.AdamW(loop_model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.weight_decay)
        torch.manual_seed(0)
        grads = [torch.randn_like(p) for p in model.parameters()]
        seconds = {"default loop": 0.0, "fused": 0.0}
        for step in range(args.steps + 1):  # step 0: warm-up (state allocation), not timed
            for label, m, opt in (("default loop", loop_model, loop), ("fused", model, fused)):
                for p, g in zip(m.parameters(), grads, strict=True):
                    p.grad = g.clone()
                start = time.perf_counter()
                opt.step()
                if step:
                    seconds[label] += time.perf_counter() - start
        n = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), loop_model.parameters(),
                                                                   strict=True))
        ms = {k: 1000 * v / args.steps for k, v in seconds.items()}
        print(f"{name}: {n / 1e6:.2f}M parameters in {len(grads)} tensors: "
              f"default loop {ms['default loop']:.2f} ms, fused {ms['fused']:.2f} ms a step: "
              f"fused {ms['default loop'] / ms['fused']:.2f}× "
              f"(largest weight difference after {args.steps + 1} steps: {diff:.1e})")


if __name__ == "__main__":
    main()
