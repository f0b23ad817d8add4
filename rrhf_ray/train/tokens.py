"""Text to token ids and back into padded tensors: one encoder and one collator for the RRHF,
SFT and reward-model trainers and the reward scorer.

A query and a response are tokenized apart and concatenated (no BPE merge across the
boundary; with byte-level BPE the split at the response's leading space is where the
pre-tokenizer splits anyway). The tokenizer's special tokens are kept where it puts them: its
prefix (e.g. <s>, [CLS]) always opens the sequence, even when the query is cut.

- A *policy* sequence (RRHF, SFT) is `prefix + query + query-suffix + response + EOS`: the prompt
  exactly as vLLM tokenizes it, and the EOS that closes the response (its log-probability is
  part of the response's score, RRHF eq. 1).
- A *reward* sequence (reward model) is `prefix + query + response + suffix`: special tokens wrap
  the whole, as `AutoModelForSequenceClassification` expects.

When a sequence exceeds `max_length`, the query is cut from the left (the end of a dialogue,
the turn being answered, matters most); a response longer than the budget alone is cut from the
right (then a policy response has no EOS).

A query that is a conversation (`rrhf_ray.types.Conversation`) is rendered by the tokenizer's
chat template (`apply_chat_template(add_generation_prompt=True)`) into the prompt ids, by the
sampler's engine and the trainer alike (`prompt_ids`), so both see the same tokens; a tokenizer
without a template reads it in the paper's raw-text layout (`conversation_text`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rrhf_ray.types import Conversation, Query, conversation_text

if TYPE_CHECKING:  # torch is imported where a batch is built: a rule reward's worker reads
    import torch  # queries through this module and never needs it (~1 s of import)

IGNORE = -100  # label of a token that carries no loss (the query, the padding)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token ids: the vocabulary (added tokens included) and the
    special token ids. Two tokenizers with one fingerprint map text to the same ids, so token
    ids a sampler recorded can be trained on as they are."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    template = chat_template_of(tokenizer)
    # The chat template decides a conversation's prompt ids; a tokenizer without one keeps the
    # fingerprint it always had.
    blob = json.dumps([vocab, special] + ([template] if template else []), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (a Jinja string), None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    return template or None


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template; a template that renders
    them to nothing is a ValueError."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if not ids:
        raise ValueError("the chat template renders the conversation to nothing")
    return ids


def prompt_ids(tokenizer: Any, query: Query) -> list[int]:
    """The prompt ids of `query` as the policy reads it: raw text tokenized as it always was; a
    conversation rendered by the chat template with the assistant's turn opened, or, for a
    tokenizer without a template, tokenized in the raw-text layout (`conversation_text`)."""
    if isinstance(query, str):
        return tokenizer(query)["input_ids"]
    if chat_template_of(tokenizer):
        return chat_ids(tokenizer, [m.model_dump() for m in query], add_generation_prompt=True)
    return tokenizer(conversation_text(query))["input_ids"]


def reward_ids(tokenizer: Any, conversation: Conversation, response: str, max_length: int) -> list[int]:
    """Token ids of (conversation + the assistant's `response`) rendered by the reward model's
    own chat template, within `max_length`: too long, whole turns are cut from the left (a system
    message kept) while a user turn still opens what is left; then, if still too long, the ids
    are cut from the left. A reward sequence, so the template's closing tokens stay."""
    reply = {"role": "assistant", "content": response}
    system = [m.model_dump() for m in conversation[:1] if m.role == "system"]
    turns = [m.model_dump() for m in conversation[len(system):]]
    ids = chat_ids(tokenizer, [*system, *turns, reply], add_generation_prompt=False)
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
    for start in starts:
        if len(ids) <= max_length:
            break
        ids = chat_ids(tokenizer, [*system, *turns[start:], reply], add_generation_prompt=False)
    return ids[-max_length:]


def special_split(tokenizer: Any, query: str) -> tuple[list[int], list[int], list[int]]:
    """(special prefix, query tokens, special suffix) of the tokenizer's encoding of `query`."""
    body = tokenizer(query, add_special_tokens=False)["input_ids"]
    full = tokenizer(query)["input_ids"]
    start = next((i for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), 0)
    return full[:start], body, full[start + len(body) :]


def turn_end_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML's
    `<|im_end|>`, Llama-3's `<|eot_id|>`), found by rendering a probe turn; None without a
    template or when the turn's text is not followed by a special token."""
    if not chat_template_of(tokenizer):
        return None
    probe, user = "PROBE", [{"role": "user", "content": "x"}]
    try:
        head = chat_ids(tokenizer, user, add_generation_prompt=True)
        full = chat_ids(tokenizer, [*user, {"role": "assistant", "content": probe}], add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe has no end token to find
        return None
    content = tokenizer(probe, add_special_tokens=False)["input_ids"]
    tail = full[len(head):] if full[:len(head)] == head else []
    if tail[:len(content)] != content or len(tail) <= len(content):
        return None
    end = tail[len(content)]
    return end if end in set(tokenizer.all_special_ids) else None


def closing_id(tokenizer: Any, query: Query) -> int:
    """The token that closes a reply to `query`: a conversation's turn end when the template
    has one, else (and for raw text, always) the EOS."""
    end = None if isinstance(query, str) else turn_end_id(tokenizer)
    return tokenizer.eos_token_id if end is None else end


def encode(tokenizer: Any, query: Query, response: str, max_length: int, *, policy: bool = True,
           closed: bool = True) -> tuple[list[int], int]:
    """(token ids, index of the first response token) of query + response within `max_length`.

    `policy=True`: a policy sequence closed with the tokenizer's EOS; `policy=False`: a reward
    sequence (module docstring). `closed=False`: a policy response that did not end (a sampled
    reply cut off at `max_new_tokens`) gets no EOS, so a perplexity does not score a terminator
    its generator never emitted. A conversation's prompt is `prompt_ids` (cut from the left to
    fit), its reply closed by `closing_id`; as a reward sequence it is `reward_ids`.
    """
    if not isinstance(query, str) and not policy and chat_template_of(tokenizer):
        return reward_ids(tokenizer, query, response, max_length), 0
    if not isinstance(query, str) and not policy:
        query = conversation_text(query)  # a reward model without a template reads raw text
    if not isinstance(query, str):
        prompt = prompt_ids(tokenizer, query)
        reply = tokenizer(response, add_special_tokens=False)["input_ids"]
        reply = (reply + [closing_id(tokenizer, query)] if closed else reply)[: max(0, max_length - 1)]
        prompt = prompt[len(prompt) - (max_length - len(reply)):]
        return prompt + reply, len(prompt)
    prefix, body, suffix = special_split(tokenizer, query)
    reply = tokenizer(response, add_special_tokens=False)["input_ids"]
    if policy:
        reply = reply + [tokenizer.eos_token_id] if closed else reply
        prompt_end, end = suffix, []
    else:
        prompt_end, end = [], suffix
    fixed = len(prefix) + len(prompt_end) + len(end)
    # At least one token precedes the response: something must predict its first token.
    reply = reply[: max(0, max_length - fixed - (1 if policy and not (prefix or prompt_end) else 0))]
    room = max_length - fixed - len(reply)
    body = body[len(body) - room :] if 0 < room < len(body) else body if room > 0 else []
    prompt = prefix + body + prompt_end
    return prompt + reply + end, len(prompt)


@dataclass
class Batch:
    """Right-padded rows: input_ids, attention_mask (1 on real tokens) and response_mask (True
    on the response tokens, EOS included), each [N, T]. Right padding keeps every real token at
    the position it has unpadded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def labels(self) -> torch.Tensor:
        """The input ids on response tokens, `IGNORE` elsewhere (causal-LM labels)."""
        import torch

        return torch.where(self.response_mask, self.input_ids, torch.full_like(self.input_ids, IGNORE))


def collate(rows: Sequence[tuple[list[int], int]] | Sequence[list[int]], pad_id: int) -> Batch:
    """Right-pad `(ids, response_start)` rows (or plain id lists: no response) into a `Batch`."""
    import torch

    pairs = [(r, len(r)) if not isinstance(r, tuple) else r for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.bool)
    for row, (ids, start) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        response[row, start : len(ids)] = True
    return Batch(input_ids, attention, response)
