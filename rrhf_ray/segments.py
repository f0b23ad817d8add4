"""The online policy's plan (OP-k, `sampling.preset: OP`): which queries each segment samples.

A run of `rounds` passes over the training queries streams each pass in segments of
`online.refresh_every` × `train.queries_per_step` queries: a segment is sampled by the weights the
previous segment trained, scored, trained for `refresh_every` optimizer steps (its pool once), and
its weights go to the samplers before the next segment samples. Each pass visits the queries in a
seeded order of its own. Pure: the driver (`rrhf_ray.workflow`) and the tests call it alike.

Segment numbers run over the whole run (1, 2, …): segment s trains policy version s from version
s − 1 (version 0 is ρ), the same numbering the samplers' `policy@<version>` tags and the warm
trainer's rounds use. With `online.max_staleness: 1` (one-step overlap) segment s is sampled by
version s − 2 while segment s − 1 trains (`sampler_version`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One segment of the online policy: pass `round` (1-based), its `index` within the pass
    (1-based), its `number` over the run (the policy version it trains), the training query
    indices it samples, and the optimizer steps they make."""

    round: int
    index: int
    number: int
    queries: tuple[int, ...]
    steps: int

    @property
    def name(self) -> str:
        """Its stages' prefix in state.json: `round<r>/seg<i>` (`round1/seg3/train`)."""
        return f"round{self.round}/seg{self.index}"


def steps_of(n: int, queries_per_step: int, num_workers: int = 1) -> int:
    """The optimizer steps `n` query groups make (as `rrhf_ray.train.loop.plan_steps` cuts them:
    a last step too small to give every worker a group joins the one before)."""
    steps = math.ceil(n / queries_per_step)
    if steps > 1 and 0 < n % queries_per_step < num_workers:
        steps -= 1
    return steps


def pass_order(n: int, seed: int, round_index: int) -> list[int]:
    """The order pass `round_index` visits queries 0 … n−1 in: a permutation seeded by (seed, pass)."""
    digest = hashlib.blake2b(f"{seed}:online-pass:{round_index}".encode(), digest_size=8).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order


def plan_segments(n: int, queries_per_step: int, refresh_every: int, rounds: int, seed: int = 0,
                  num_workers: int = 1) -> list[Segment]:
    """Every segment of a run over `n` training queries: `rounds` passes, each cut into segments of
    `refresh_every × queries_per_step` queries in the pass's order (`pass_order`). A pass's last
    segment holds what is left; one too small to feed every worker joins the segment before."""
    if n < num_workers:
        raise ValueError(f"{n} training queries cannot feed {num_workers} workers")
    size = refresh_every * queries_per_step
    out: list[Segment] = []
    for r in range(1, rounds + 1):
        order = pass_order(n, seed, r)
        parts = [order[i : i + size] for i in range(0, n, size)]
        if len(parts) > 1 and len(parts[-1]) < num_workers:
            parts[-2].extend(parts.pop())
        for i, part in enumerate(parts, start=1):
            out.append(Segment(r, i, len(out) + 1, tuple(part), steps_of(len(part), queries_per_step, num_workers)))
    return out


def total_steps(segments: list[Segment]) -> int:
    """The optimizer steps of the whole run: the length of its one LR schedule."""
    return sum(s.steps for s in segments)


def last_trained(segments: list[Segment], done: set[str]) -> int:
    """The number of the last segment whose training is finished (its `<name>/train` stage is in
    `done`), 0 when none is: a resumed run restarts from that segment's checkpoint. Segments train
    in order, so the first unfinished one ends the search."""
    last = 0
    for seg in segments:
        if f"{seg.name}/train" not in done:
            break
        last = seg.number
    return last


def redone_with(seg: Segment, segments: list[Segment], names: list[str]) -> list[str]:
    """The stages of `names` (state.json's) that depend on segment `seg`'s checkpoint, in their
    order: its own train and refresh, every stage of a later segment, and the evaluation of its
    round and of every later round. What a damaged checkpoint of `seg` makes the driver redo."""
    number = {(s.round, s.index): s.number for s in segments}
    out = []
    for name in names:
        if name in (f"{seg.name}/train", f"{seg.name}/refresh"):
            out.append(name)
        elif m := re.fullmatch(r"round(\d+)/seg(\d+)/\w+", name):
            if number.get((int(m.group(1)), int(m.group(2))), 0) > seg.number:
                out.append(name)
        elif (m := re.fullmatch(r"round(\d+)/eval", name)) and int(m.group(1)) >= seg.round:
            out.append(name)
    return out


def sampler_version(number: int, staleness: int) -> int:
    """The policy version that samples segment `number`: the one before it trains (s − 1), or with
    `staleness` 1 the one before that (s − 2, sampled while segment s − 1 trains); ρ (0) at least.
    Segment s trains from version s − 1, so its candidates are at most `staleness` versions behind."""
    return max(0, number - 1 - staleness)


def serving_version(segments: list[Segment], sampled: set[str], last: int, staleness: int) -> int:
    """The policy version a (re)started run's samplers load: the one that samples the first segment
    whose candidates are not all drawn and weighed yet (its `<name>/kl` stage is not in `sampled`),
    never newer than `last` (the last trained, `last_trained`). Without staleness that is `last`;
    with it, a driver killed while segment s trained beside segment s+1's sampling restarts that
    sampling from version s − 1, as the killed driver drew it, not from version s."""
    for seg in segments:
        if f"{seg.name}/kl" not in sampled:
            return min(last, sampler_version(seg.number, staleness))
    return last
