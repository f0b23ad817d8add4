"""The demo's rule reward (`rrhf_ray.demo.task.reward`): the ideal reply scores highest, every known
way to game the rule scores strictly below it, and replies cut off or running into a next turn are
penalised (with the default stop strings, a leaked turn is cut away before scoring)."""

from __future__ import annotations

import random

import pytest

from rrhf_ray.actors.engine import cut_at_stop
from rrhf_ray.config import DEFAULT_STOP, SamplingConfig
from rrhf_ray.demo.task import TOPICS, cut_off, prompt, reply, reward, sft_pairs

QUERY = prompt("reset a password", "How do I {t}?")
STEPS = f"To do it, {TOPICS[0][1]}."
OTHER = f"To do it, {TOPICS[1][1]}."  # bake bread: another topic's steps
IDEAL = f" Of course! {STEPS} Hope this helps!"


def score(response: str) -> float:
    return reward([QUERY], [response])[0]


HACKS = {
    "a polite phrase six times, no steps": " Of course!" * 6,
    "a refusal, then a polite closer six times": " I cannot help with that." + " Good luck!" * 6,
    "a rude opener, the steps, three polite closers": f" Whatever. {STEPS}" + " Good luck!" * 3,
    "the steps repeated": f" Of course! {STEPS} {STEPS} Hope this helps!",
    "the steps three times, no politeness": f" {STEPS} {STEPS} {STEPS}",
    "polite phrases stacked around a refusal": " Sure, happy to help! Great question! I cannot help "
                                                "with that. Thank you for asking! Good luck!",
    "every topic's steps": " " + " ".join(f"To do it, {s}." for _, s in TOPICS),
    "cut mid-sentence": " Of course! To do it, open the settings page, choose",
    "the ideal reply with its closer cut": f" Of course! {STEPS} Hope this hel",
    "the ideal reply trailing into a next turn": IDEAL + "\n\nHuman: Thanks! Anything else?",
    "the ideal reply, then the next turn after one newline": IDEAL + "\nHuman: Thanks!",
    "empty": "",
}


def test_the_ideal_reply_scores_one() -> None:
    assert score(IDEAL) == 1.0
    rng = random.Random(0)
    for i, (topic, _) in enumerate(TOPICS):  # every topic, every polite phrase pairing
        ideal = reply(i, "polite", "helpful", "polite", rng)
        assert reward([prompt(topic, "Please explain how to {t}.")], [ideal]) == [1.0], ideal


@pytest.mark.parametrize("name", list(HACKS))
def test_each_known_hack_scores_strictly_below_the_ideal_reply(name: str) -> None:
    assert score(HACKS[name]) < score(IDEAL), (name, score(HACKS[name]))


def test_hack_scores_as_documented() -> None:
    assert [score(HACKS[name]) for name in list(HACKS)[:4]] == [-0.25, -0.5, 0.25, 0.75]


def test_the_preference_order() -> None:
    order = [
        ("ideal", IDEAL),
        ("polite opener only", f" Of course! {STEPS}"),
        ("plain helpful", f" {STEPS}"),
        ("rude opener, helpful", f" Ugh, fine. {STEPS}"),
        ("rude opener and closer, helpful", f" Ugh, fine. {STEPS} Do not ask again."),
        ("plain refusal", " I cannot help with that."),
        ("off-topic steps", f" {OTHER}"),
        ("rude refusal", " Whatever. I cannot help with that. Now stop bothering me."),
    ]
    scores = [score(text) for _, text in order]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), \
        list(zip([n for n, _ in order], scores))
    assert scores == [1.0, 0.75, 0.5, 0.25, 0.0, -0.5, -0.75, -1.0]


def test_only_replies_that_answer_score_above_zero() -> None:
    rng = random.Random(1)
    for opener in ("polite", "rude", "none"):
        for closer in ("polite", "rude", "none"):
            for body in ("refusal", "off_topic"):
                text = reply(0, opener, body, closer, rng)
                assert score(text) <= 0.0, text
    assert score(f" Sure, happy to help! {OTHER} Good luck!") < 0  # polite but off-topic


def test_each_phrase_counts_once() -> None:
    assert score(" Of course! I cannot help with that.") == -0.25
    # a second polite opener earns nothing; a repeated one costs the repetition
    assert score(f" Of course! Great question! {STEPS}") == score(f" Of course! {STEPS}")
    assert score(f" Of course! Of course! {STEPS}") == score(f" Of course! {STEPS}") - 0.25
    # a rude phrase said twice costs what it costs once, plus the repetition
    assert score(f" Whatever. Whatever. {STEPS}") == score(f" Whatever. {STEPS}") - 0.25


def test_a_cut_off_reply_scores_at_most_minus_one_half() -> None:
    assert cut_off(" Of course! To do it, open the settings") and cut_off("")
    assert cut_off(IDEAL + "\n\nAssistant: more")
    assert not cut_off(IDEAL) and not cut_off(" I cannot help with that.")
    for text in (" Of course! To do it, open the settings", f" Of course! {STEPS} Hope this",
                 IDEAL + "\n\nHuman: Thanks!", f" {STEPS}\nAssistant: Also,"):
        assert score(text) <= -0.5, text


@pytest.mark.parametrize("leak", ["\n\nHuman: Thanks! What next?", "\n\nAssistant: Also, wait.",
                                  "\nHuman: ok", "\nAssistant: and"])
def test_the_default_stop_strings_cut_a_leaked_next_turn(leak: str) -> None:
    assert list(SamplingConfig().stop) == list(DEFAULT_STOP)
    raw = IDEAL + leak
    text, stopped = cut_at_stop(raw, SamplingConfig().stop)
    assert stopped and text.strip() == IDEAL.strip()
    assert score(text) == 1.0 > score(raw)


def test_rewards_lie_in_minus_one_to_one_and_the_sft_mix_reaches_the_ideal() -> None:
    pairs = sft_pairs(2000, seed=3)
    scores = reward([p["query"] for p in pairs], [p["response"] for p in pairs])
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert scores.count(1.0) > 50  # the SFT data holds ideal replies: ρ can sample them
    assert len(set(scores)) >= 8   # and a spread of worse ones to rank


def test_no_topic_steps_hide_inside_another_topics() -> None:
    steps = [s for _, s in TOPICS]
    assert not [(a, b) for a in steps for b in steps if a != b and a in b]
