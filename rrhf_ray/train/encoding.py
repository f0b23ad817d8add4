"""Query groups as token ids for the RRHF trainer (`Encoder` → `EncodedGroup`: the prompt once,
then each candidate's response), and a batch of groups as the [B, K] tensors the losses of
`rrhf_ray.loss` read (`group_tensors`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_ray.train.prefix import tokens_computed
from rrhf_ray.train.tokens import special_split, tokenizer_fingerprint
from rrhf_ray.types import QueryGroup


@dataclass
class EncodedGroup:
    """One query group as token ids: the prompt once, then each candidate's response (the EOS
    that closes it included when it stopped). Candidate i is `prompt + responses[i]`."""

    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]
    kept: list[int] | None = None  # the group's candidate index of each response (None: all, in order)
    refs: list[float] | None = None  # DPO: Σ log π_ref of each response (QueryGroup.ref_logprobs)

    @property
    def ids(self) -> list[list[int]]:
        """Each candidate as one row, prompt included (the padded layout)."""
        return [self.prompt + r for r in self.responses]

    @property
    def starts(self) -> list[int]:
        return [len(self.prompt)] * len(self.responses)

    def tokens(self, shared: bool) -> int:
        """Tokens one forward computes for this group (`rrhf_ray.train.prefix.tokens_computed`)."""
        return tokens_computed(len(self.prompt), [len(r) for r in self.responses], shared)


@dataclass
class Encoder:
    """Query groups → `EncodedGroup`s for one tokenizer (one per trainer).

    Token ids a sampler recorded are used as they are when the group's tokenizer fingerprint is
    this tokenizer's; other candidates (data set responses, files, another tokenizer) are
    tokenized from their text. EOS closes a response that stopped; a response cut off by the
    sampler's length limit (`finish_reason: length`) gets none, so the fine-tuning term never
    teaches the model to stop mid-sentence; with `truncated="drop"` such candidates leave the
    group (ranking and fine-tuning alike). One prompt per group: when a group exceeds
    `max_length`, responses longer than the budget are cut from the right, then the query is
    cut from the left (its special prefix, e.g. BOS, kept) once for all k candidates, so every
    candidate is scored against the same context.
    """

    tokenizer: Any
    max_length: int
    truncated: str = "keep"
    dropped: int = 0  # candidates left out (truncated="drop")

    def __post_init__(self) -> None:
        prefix, _, suffix = special_split(self.tokenizer, "x")
        self.n_prefix, self.n_suffix = len(prefix), len(suffix)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.eos = self.tokenizer.eos_token_id

    def __call__(self, group: QueryGroup) -> EncodedGroup | None:
        own = group.tokenizer == self.fingerprint
        if own and group.prompt_ids:
            prompt = list(group.prompt_ids)
        else:
            prompt = self.tokenizer(group.query)["input_ids"]
        token_ids = group.token_ids if own and group.token_ids else [None] * group.k
        finish = group.finish_reasons or [None] * group.k
        responses, rewards, kept = [], [], []
        for i, text in enumerate(group.responses):
            truncated = finish[i] == "length"
            if truncated and self.truncated == "drop":
                self.dropped += 1
                continue
            ids = list(token_ids[i]) if token_ids[i] else self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not truncated and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            responses.append(ids)
            rewards.append(group.scores[i])
            kept.append(i)
        if not responses:
            return None
        refs = None
        if group.ref_logprobs is not None:
            refs = [group.ref_logprobs[i] for i in kept]
            if any(r is None for r in refs):
                raise ValueError(f"query {group.query[:60]!r}: ref_logprobs is null for a candidate the "
                                 "trainer scores (computed with another train.truncated?)")
        return EncodedGroup(self._fit(prompt, responses), responses, rewards, kept, refs)

    def _fit(self, prompt: list[int], responses: list[list[int]]) -> list[int]:
        """Cut responses (in place) and the prompt so every candidate fits `max_length`."""
        fixed = self.n_prefix + self.n_suffix
        cap = max(1, self.max_length - max(fixed, 1))  # a response needs one token before it
        for r in responses:
            del r[cap:]
        room = self.max_length - max(len(r) for r in responses) - fixed
        body = prompt[self.n_prefix : len(prompt) - self.n_suffix]
        if len(body) > room:
            body = body[len(body) - max(room, 0):] if room > 0 else []
            return prompt[: self.n_prefix] + body + prompt[len(prompt) - self.n_suffix :]
        return prompt


@dataclass
class GroupTensors:
    """A batch of B query groups as [B, K] tensors, K the most candidates of a group: each
    candidate's Σ log π over its response (`logp_sum`), its response length, its reward, and
    `valid` (False in the empty slots of a group with fewer than K candidates; the other tensors
    hold 0 there)."""

    logp_sum: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    valid: torch.Tensor


def per_group(groups: Sequence[EncodedGroup], values: Sequence[Sequence[float]],
              device: torch.device) -> torch.Tensor:
    """[B, K] float32 of one value per candidate of each group (0 in empty slots)."""
    out = torch.zeros((len(groups), max(len(g.responses) for g in groups)), dtype=torch.float32,
                      device=device)
    for bi, v in enumerate(values):
        out[bi, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def group_tensors(groups: Sequence[EncodedGroup], logp: torch.Tensor, lengths: torch.Tensor) -> GroupTensors:
    """The [B, K] tensors of `groups` from the flat, query-major [N] log-probabilities and response
    lengths of their candidates (`rrhf_ray.train.rrhf.candidate_logprobs`), on their device."""
    rewards = per_group(groups, [g.rewards for g in groups], logp.device)
    valid = torch.zeros(rewards.shape, dtype=torch.bool, device=logp.device)
    for bi, g in enumerate(groups):
        valid[bi, : len(g.rewards)] = True
    return GroupTensors(logp.new_zeros(valid.shape).masked_scatter(valid, logp),
                        lengths.new_zeros(valid.shape).masked_scatter(valid, lengths), rewards, valid)
