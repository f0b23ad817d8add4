"""The online policy's optimizer across segments (`rrhf_ray.train.warm`): a segment's checkpoint
keeps the AdamW, the LR schedule and the float32 weights, so a run resumed from it trains the
next segment exactly as the run that kept going in memory."""

from __future__ import annotations

import torch

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.checkpoints import write_checkpoint
from rrhf_ray.train.loop import Optimizer, train_epochs
from rrhf_ray.train.rrhf import rrhf_recipe
from rrhf_ray.train.warm import online_state, resume_online
from rrhf_ray.train.worker import Worker, load_policy
from tests.helpers import write_ranked

CFG = TrainConfig(epochs=1, queries_per_step=1, micro_batch_queries=1, max_length=64, lr=5e-3,
                  lr_scheduler="cosine", warmup_ratio=0.25)
TOTAL = 4  # the run's steps: segment 1 = 2 steps, segment 2 = 2 steps


def _segment(w: Worker, opt: Optimizer, pool, step: int, seed: int) -> None:
    train_epochs(w, rrhf_recipe(CFG, [str(pool)], w.tokenizer, w.device, w.model), opt, global_step=step, seed=seed)


def _weights(w: Worker) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.model.state_dict().items()}


def test_a_segment_resumed_from_its_checkpoint_continues_exactly(tiny_model_dir, tmp_path):
    seg1, seg2 = write_ranked(tmp_path / "seg1.jsonl", 2), write_ranked(tmp_path / "seg2.jsonl", 2, offset=2)
    w = Worker.load(str(tiny_model_dir), CFG, False, False, load_policy)
    opt = Optimizer.build(w.ddp_model, CFG, TOTAL)
    _segment(w, opt, seg1, 0, seed=1)
    ckpt = tmp_path / "seg1-checkpoint"
    # Saved as the samplers load it (bf16 model files), the float32 weights beside the optimizer.
    write_checkpoint(ckpt, w.ddp_model, w.tokenizer, CFG, epoch=0, final=True, dtype="bfloat16", round=1,
                     global_step=2, optimizer_state=online_state(w, opt))
    _segment(w, opt, seg2, 2, seed=2)  # the run that kept going
    kept, lr_kept = _weights(w), opt.scheduler.get_last_lr()[0]

    resumed = Worker.load(str(ckpt), CFG, False, False, load_policy)
    opt2 = Optimizer.build(resumed.ddp_model, CFG, TOTAL)
    assert resume_online(resumed, opt2, str(ckpt))
    assert opt2.scheduler.last_epoch == 2  # the schedule continues at step 2 of 4, not at 0
    _segment(resumed, opt2, seg2, 2, seed=2)
    after = _weights(resumed)
    assert all(torch.equal(kept[k], after[k]) for k in kept), "the resumed segment trained other weights"
    assert opt2.scheduler.get_last_lr()[0] == lr_kept

    # Without the saved state (the bf16 model files, a fresh AdamW and schedule) it would differ.
    fresh = Worker.load(str(ckpt), CFG, False, False, load_policy)
    _segment(fresh, Optimizer.build(fresh.ddp_model, CFG, TOTAL), seg2, 2, seed=2)
    assert any(not torch.equal(kept[k], v) for k, v in _weights(fresh).items())
    assert not resume_online(fresh, Optimizer.build(fresh.ddp_model, CFG, TOTAL), str(tiny_model_dir))
