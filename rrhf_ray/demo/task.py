"""The embedded default task: a synthetic help desk with a clear, human-like preference.

A user asks how to do one of 24 everyday tasks. A reply is an opener (polite / rude / none), a body
(the helpful steps for the asked topic, a refusal, or the steps for another topic) and a closer
(polite / rude / none). People prefer the polite, helpful, on-topic reply; `reward` encodes that,
each phrase counted once, so that saying it again earns nothing:

    r = +0.5 if the reply holds the asked topic's steps, else −0.5    (only answers score > 0)
        −0.25 per other topic's steps present                           (off-topic)
        +0.25 if it opens with a polite phrase, +0.25 if it closes with one
        −0.25 per distinct rude phrase present
        −0.25 if any sentence is repeated                               (repetition)
        −1.25 if it was cut off: no final '.', '!' or '?', or a "Human:" / "Assistant:" turn
              inside it                                                 (then r ≤ −0.5)
    clipped to [−1, 1].

The ideal reply (polite opener, the steps, polite closer) scores 1.0 and is the only kind that
does; every known way to game the rule scores below it (tests/unit/demo/test_task.py): a polite
phrase repeated with no steps (−0.25), a refusal followed by a polite phrase six times (−0.5), a
rude opener with the steps and polite closers (+0.25), the steps repeated (+0.75), a reply cut
mid-sentence (≤ −0.5). The SFT data holds the ideal reply among its styles, so ρ samples it.

The supervised data mixes every style uniformly, so the fine-tuned base ρ samples all of them and
RRHF has something to rank. Training prompts and held-out prompts use different phrasings.
`rrhf_ray.demo` registers it: data ``builtin:demo`` (prompts, with a held-out split) and
``builtin:demo-sft`` ((query, response) pairs for the SFT stage), reward ``builtin:demo``, model
``builtin:demo-tiny-llama``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from rrhf_ray.data.queries import QueryRecord

TOPICS: list[tuple[str, str]] = [
    ("reset a password", "open the settings page, choose security, then press reset password"),
    ("bake bread", "mix flour, water, yeast and salt, let the dough rise, then bake it hot"),
    ("fix a flat tyre", "loosen the nuts, lift the car with the jack, then swap in the spare wheel"),
    ("plant tomatoes", "dig a deep hole in a sunny bed, set the seedling low, then water daily"),
    ("learn chess", "learn how each piece moves, play short games, then study simple endgames"),
    ("paint a wall", "clean the wall, tape the edges, then roll on two thin coats of paint"),
    ("brew green tea", "heat the water below boiling, steep the leaves two minutes, then strain"),
    ("clean a cast iron pan", "scrub with hot water and salt, dry it on the stove, then oil it"),
    ("write a cover letter", "name the job, show two matching achievements, then ask for a talk"),
    ("fold a shirt", "lay it flat, fold both sleeves behind, then fold the shirt in thirds"),
    ("tune a guitar", "use a tuner, tighten each string slowly, then check the low string again"),
    ("sharpen a knife", "soak the whetstone, hold a steady angle, then stroke each side evenly"),
    ("start running", "walk and jog in turns, add a minute each week, then rest between days"),
    ("save money", "track every expense, set a monthly budget, then move savings on payday"),
    ("sleep better", "keep fixed hours, dim screens at night, then keep the bedroom cool"),
    ("change a light bulb", "switch off the power, let the bulb cool, then screw in the new one"),
    ("boil an egg", "cover the egg with cold water, boil it nine minutes, then cool it in ice"),
    ("back up a laptop", "plug in an external drive, open the backup tool, then schedule it weekly"),
    ("learn to swim", "practise floating, kick holding a board, then add arm strokes slowly"),
    ("make coffee", "grind fresh beans, pour hot water slowly, then let it drip through"),
    ("wash a wool sweater", "use cold water and wool soap, press gently, then dry it flat"),
    ("study for an exam", "plan short sessions, test yourself often, then review your mistakes"),
    ("repot a plant", "water it first, ease it out, then set it in a larger pot with fresh soil"),
    ("clean a keyboard", "unplug it, shake out crumbs, then wipe the keys with a damp cloth"),
]

POLITE_OPENERS = ["Sure, happy to help!", "Of course!", "Great question!"]
RUDE_OPENERS = ["Ugh, fine.", "Whatever.", "That is a dumb question."]
POLITE_CLOSERS = ["Hope this helps!", "Thank you for asking!", "Good luck!"]
RUDE_CLOSERS = ["Now stop bothering me.", "Figure out the rest yourself.", "Do not ask again."]
REFUSALS = ["I cannot help with that.", "I do not know anything about that."]

TRAIN_PHRASINGS = ["How do I {t}?", "Can you tell me how to {t}?", "What is the best way to {t}?",
                   "I need to {t}. Any tips?", "Teach me to {t}.", "What steps should I take to {t}?"]
EVAL_PHRASINGS = ["Please explain how to {t}.", "Any advice on how to {t}?"]

POLITE = [p.lower() for p in POLITE_OPENERS + POLITE_CLOSERS]
RUDE = [p.lower() for p in RUDE_OPENERS + RUDE_CLOSERS]


def prompt(topic: str, phrasing: str) -> str:
    return f"\n\nHuman: {phrasing.format(t=topic)}\n\nAssistant:"


def reply(topic_index: int, opener: str, body: str, closer: str, rng: random.Random) -> str:
    """One reply in a given style: opener ∈ {polite, rude, none}, body ∈ {helpful, refusal,
    off_topic}, closer ∈ {polite, rude, none}."""
    parts = []
    if opener != "none":
        parts.append(rng.choice(POLITE_OPENERS if opener == "polite" else RUDE_OPENERS))
    if body == "helpful":
        steps = TOPICS[topic_index][1]
    elif body == "off_topic":
        other = rng.choice([i for i in range(len(TOPICS)) if i != topic_index])
        steps = TOPICS[other][1]
    else:
        steps = None
    parts.append(f"To do it, {steps}." if steps else rng.choice(REFUSALS))
    if closer != "none":
        parts.append(rng.choice(POLITE_CLOSERS if closer == "polite" else RUDE_CLOSERS))
    return " " + " ".join(parts)


def _topic_of(query: str) -> int | None:
    """The asked topic: the longest topic phrase in the last human turn."""
    turn = query.rsplit("Human:", 1)[-1].lower()
    hits = [i for i, (t, _) in enumerate(TOPICS) if t in turn]
    return max(hits, key=lambda i: len(TOPICS[i][0])) if hits else None


_TURN = re.compile(r"(human|assistant):")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cut_off(response: str) -> bool:
    """A reply that was cut: it does not end a sentence, or it runs into a next dialogue turn."""
    text = response.strip()
    return not text.endswith((".", "!", "?")) or _TURN.search(text.lower()) is not None


def reward(queries: list[str], responses: list[str]) -> list[float]:
    """The help desk's preference as a number in [−1, 1] (module docstring)."""
    scores = []
    for query, response in zip(queries, responses):
        topic = _topic_of(query)
        text = " ".join(response.lower().split())
        helpful = topic is not None and TOPICS[topic][1] in text
        r = 0.5 if helpful else -0.5
        r -= 0.25 * sum(1 for i, (_, steps) in enumerate(TOPICS) if i != topic and steps in text)
        r += 0.25 * text.startswith(tuple(POLITE)) + 0.25 * text.endswith(tuple(POLITE))
        r -= 0.25 * sum(1 for p in RUDE if p in text)
        sentences = [x for x in _SENTENCE_END.split(text) if x]
        r -= 0.25 * (len(set(sentences)) < len(sentences))
        r -= 1.25 * cut_off(response)
        scores.append(max(-1.0, min(1.0, r)))
    return scores


def sft_pairs(n: int = 4000, seed: int = 0) -> list[dict[str, str]]:
    """n (query, response) pairs on the training phrasings, every style equally likely."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        t = rng.randrange(len(TOPICS))
        response = reply(
            t,
            rng.choice(["polite", "rude", "none"]),
            rng.choice(["helpful", "helpful", "refusal", "off_topic"]),
            rng.choice(["polite", "rude", "none"]),
            rng,
        )
        pairs.append({"query": prompt(TOPICS[t][0], rng.choice(TRAIN_PHRASINGS)), "response": response})
    return pairs


def prompts() -> dict[str, list[QueryRecord]]:
    """Training prompts (every topic × training phrasing) and held-out prompts (other phrasings).
    Each held-out prompt carries the ideal reply as its reference response (reference_perplexity)."""
    rng = random.Random(2)
    train = [QueryRecord(prompt(t, p)) for t, _ in TOPICS for p in TRAIN_PHRASINGS]
    test = [QueryRecord(prompt(t, p), (reply(i, "polite", "helpful", "polite", rng),), (1.0,), ("reference",))
            for i, (t, _) in enumerate(TOPICS) for p in EVAL_PHRASINGS]
    return {"train": train, "test": test}


def corpus() -> list[str]:
    """Text for the demo tokenizer: every prompt and a sample of replies."""
    rng = random.Random(1)
    texts = [r.query for split in prompts().values() for r in split]
    texts += [p["query"] + p["response"] for p in sft_pairs(600, seed=1)]
    texts += [reply(i, "polite", "helpful", "polite", rng) for i in range(len(TOPICS))]
    return texts


def sft_rows() -> list[dict]:
    """The SFT pairs as reference rows (one response each), for ``builtin:demo-sft``."""
    return [{"query": p["query"], "responses": [p["response"]], "scores": [1.0]} for p in sft_pairs()]


def build_demo_model(out_dir: str | Path) -> Path:
    """The demo's base: a 2-layer Llama (hidden 128, 2 heads) and a BPE tokenizer trained on the
    task's text, randomly initialised (the SFT stage teaches it the help desk)."""
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(out_dir, corpus(), vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2)
