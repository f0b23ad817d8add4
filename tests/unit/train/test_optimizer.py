"""The trainer's AdamW (`rrhf_ray.train.loop.Optimizer`): PyTorch's fused kernel where it
applies, the same update as the default per-tensor loop, and state that either one loads."""

from __future__ import annotations

import copy

import torch

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.loop import Optimizer

CFG = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, lr_scheduler="constant")


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    torch.manual_seed(0)
    for _ in range(n):
        x = torch.randn(4, 8)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_fused_adamw_updates_as_the_default_loop_and_loads_its_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    loop_model = copy.deepcopy(model)
    fused = Optimizer.build(model, CFG, total_steps=10)
    assert fused.optimizer.defaults["fused"] is True
    loop = torch.optim.AdamW(loop_model.parameters(), lr=CFG.lr, betas=(CFG.adam_beta1, CFG.adam_beta2),
                             weight_decay=CFG.weight_decay)
    _steps(model, fused.optimizer, 3)
    _steps(loop_model, loop, 3)
    for a, b in zip(model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # A checkpoint written by the default loop (as before the fused kernel) resumes in a fused one.
    resumed = Optimizer.build(copy.deepcopy(loop_model), CFG, total_steps=10)
    resumed.optimizer.load_state_dict(loop.state_dict())
    assert int(resumed.optimizer.state_dict()["state"][0]["step"]) == 3
