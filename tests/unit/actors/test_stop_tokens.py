"""`tokens_before_stop`: the sampled token ids of a reply that vLLM cut before a stop string,
found with the prompt as context (as vLLM detokenizes), with the three tokenizer families of the
tiny-model kit: byte-level BPE (the demo's), and SentencePiece-style Metaspace BPE in Llama-2's
current and legacy `tokenizer.json` layouts. Decoding the reply alone drops the leading space for
the Metaspace ones, so a reply of " Sure." matched no prefix of its own ids.

The replies are spelled out one character a token (non-canonical: not what tokenizing the text
gives), and canonically, then followed by the tokens of the stop string "\\n\\nHuman:".
"""

from __future__ import annotations

import pytest

from rrhf_ray.actors.engine import beam_reply, tokens_before_stop
from rrhf_ray.demo.tiny import DEFAULT_CORPUS, train_metaspace_tokenizer, train_tokenizer
from rrhf_ray.types import Candidate

PROMPT = "\n\nHuman: Can you help me fix a flat tyre?\n\nAssistant:"
REPLY = " Sure. Loosen the nuts!"
STOP = "\n\nHuman:"
FAMILIES = ["byte-level", "metaspace", "metaspace-legacy"]


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer(request):
    if request.param == "byte-level":
        return train_tokenizer(DEFAULT_CORPUS)
    return train_metaspace_tokenizer(DEFAULT_CORPUS, legacy=request.param == "metaspace-legacy")


def char_ids(tokenizer, text: str) -> list[int]:
    """`text` one character a token (a space as the family's marker: "Ġ" or "▁")."""
    marker = "Ġ" if tokenizer.convert_tokens_to_ids("Ġ") != tokenizer.unk_token_id else "▁"
    pieces = [{" ": marker, "\n": "Ċ" if marker == "Ġ" else "\n"}.get(ch, ch) for ch in text]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert None not in ids and tokenizer.unk_token_id not in ids, pieces
    return ids


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT)["input_ids"]  # with <s>, as the engine tokenizes a prompt


def test_a_metaspace_reply_decoded_alone_loses_its_leading_space() -> None:
    """Why the ids were dropped: the reply's ids decode without the space vLLM's text has."""
    tok = train_metaspace_tokenizer(DEFAULT_CORPUS)
    assert tok.decode(char_ids(tok, REPLY), skip_special_tokens=True) == REPLY.lstrip()


def test_character_tokens_before_the_stop_string_are_kept(tokenizer) -> None:
    reply = char_ids(tokenizer, REPLY)
    sampled = reply + char_ids(tokenizer, STOP)
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), sampled, REPLY) == tuple(reply)


def test_canonical_tokens_before_the_stop_string_are_kept(tokenizer) -> None:
    """The reply's tokens as tokenizing prompt + reply makes them, then one word more and the stop
    string's tokens (vLLM may sample past the stop string within one step)."""
    prompt = prompt_ids(tokenizer)
    whole = tokenizer(PROMPT + REPLY)["input_ids"]
    assert whole[:len(prompt)] == prompt
    reply = whole[len(prompt):]
    sampled = reply + char_ids(tokenizer, STOP + " thanks")
    assert tokens_before_stop(tokenizer, prompt, sampled, REPLY) == tuple(reply)


def test_a_stop_string_inside_a_token_keeps_no_ids(tokenizer) -> None:
    """The stop string "ts" inside the token " nuts": no prefix of the ids is " Loosen the nu"."""
    nuts = tokenizer.convert_tokens_to_ids("Ġnuts" if "Ġnuts" in tokenizer.get_vocab() else "▁nuts")
    assert tokenizer.decode([nuts]).strip() == "nuts"
    text = " Loosen the nu"
    sampled = char_ids(tokenizer, " Loosen the") + [nuts]
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), sampled, text) == ()
    # the same text, the stop string's tokens apart: kept
    apart = char_ids(tokenizer, text + "ts")
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), apart, text) == tuple(apart[:len(text)])


def test_special_tokens_sampled_right_before_the_stop_string_are_kept(tokenizer) -> None:
    """They add no text, but the policy sampled them (and decoding the reply alone keeps them too)."""
    reply = char_ids(tokenizer, REPLY) + [tokenizer.pad_token_id, tokenizer.bos_token_id]
    sampled = reply + char_ids(tokenizer, STOP)
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), sampled, REPLY) == tuple(reply)
    assert tokens_before_stop(DecodeOnly(tokenizer), prompt_ids(tokenizer), sampled, REPLY) == tuple(reply)


def test_a_stop_string_at_the_start_leaves_no_tokens_for_an_empty_reply(tokenizer) -> None:
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), char_ids(tokenizer, STOP), "") == ()


def test_a_text_that_is_not_the_ids_keeps_none(tokenizer) -> None:
    assert tokens_before_stop(tokenizer, prompt_ids(tokenizer), char_ids(tokenizer, REPLY), " Nope.") == ()


class DecodeOnly:
    """A tokenizer with `decode` only (no Rust backend), as vLLM's slow tokenizers are."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def test_a_tokenizer_without_the_rust_backend_matches_the_same_tokens(tokenizer) -> None:
    reply = char_ids(tokenizer, REPLY)
    sampled = reply + char_ids(tokenizer, STOP)
    assert tokens_before_stop(DecodeOnly(tokenizer), prompt_ids(tokenizer), sampled, REPLY) == tuple(reply)


# --------------------------------------------------------------------------- beam search


def test_a_beam_reply_is_decoded_after_the_prompt_and_keeps_its_ids_up_to_the_stop(tokenizer) -> None:
    """vLLM's beam search leaves decoding and stop strings to the engine adapter: the text keeps
    the leading space a Metaspace reply loses when decoded alone, and the beam's ids up to the
    stop string are kept (they used to be re-tokenized from the text, with the space dropped)."""
    reply = char_ids(tokenizer, REPLY)
    beam = reply + char_ids(tokenizer, STOP + " thanks")
    text, ids, stopped = beam_reply(tokenizer, prompt_ids(tokenizer), beam, [STOP])
    assert (text, ids, stopped) == (REPLY, tuple(reply), True)
    # No stop string: the whole beam, its text with the space.
    text, ids, stopped = beam_reply(tokenizer, prompt_ids(tokenizer), reply, [STOP])
    assert (text, ids, stopped) == (REPLY, tuple(reply), False)


# --------------------------------------------------------------------------- the pool's count


def test_sampled_candidates_that_lost_their_ids_are_counted_into_the_rounds_row(tmp_path) -> None:
    """A sampled candidate without ids (not an empty reply, not a text source) is one the trainer
    re-tokenizes: `retokenized` of the sample stage, `pool_retokenized` of the round's row."""
    from rrhf_ray.report import round_row
    from rrhf_ray.stages import write_candidates

    class Preset:  # only what write_candidates reads
        policy, dataset = "policy", False

    sampled = {"tokenizer": "fp", "finish_reason": "stop", "source": "policy@0"}
    policy = [[Candidate(" Sure.", token_ids=(5, 6), **sampled), Candidate(" Sure!", **sampled),
               Candidate("", **sampled)],
              [Candidate(" No.", **sampled), Candidate(" No.", **sampled)]]  # merged: counted once
    info = write_candidates(Preset(), [], ["q1", "q2"], policy, [], tmp_path / "candidates.jsonl")
    assert info == {"groups": 2, "candidates": 4, "retokenized": 2}
    stages = {"round1/sample": info, "round1/eval": {"eval": {}}}
    assert round_row(stages, 1)["pool_retokenized"] == 2
    assert "pool_retokenized" not in round_row({"round1/eval": {"eval": {}}}, 1)


def test_a_stop_string_after_an_invalid_byte_keeps_the_byte() -> None:
    """Byte-level BPE: a lone continuation byte is held back by vLLM's stream until the next
    token, so the stop string starts inside the stream's piece "\\ufffd\\n"; decoded with the
    prompt, the byte is the reply's last character."""
    tok = train_tokenizer(DEFAULT_CORPUS)
    reply = char_ids(tok, " ok") + tok.convert_tokens_to_ids(["¡"])
    sampled = reply + char_ids(tok, STOP)
    assert tokens_before_stop(tok, prompt_ids(tok), sampled, " ok\ufffd") == tuple(reply)
