"""`cut_at_stop`: how beam-search replies are cut at stop strings (vLLM does not do it for beams)."""

from __future__ import annotations

import pytest

from rrhf_ray.actors.engine import cut_at_stop


@pytest.mark.parametrize("stop", [[], ["\n\nHuman:"], ("zzz", "###")])
def test_no_stop_string_in_the_text_keeps_it_whole(stop) -> None:
    assert cut_at_stop(" Sure, loosen the nuts.", stop) == (" Sure, loosen the nuts.", False)


def test_the_text_is_cut_before_the_stop_string() -> None:
    assert cut_at_stop(" Sure.\n\nHuman: thanks", ["\n\nHuman:"]) == (" Sure.", True)


def test_the_earliest_stop_in_the_text_wins_not_the_first_in_the_list() -> None:
    text = " one. two! three?"
    assert cut_at_stop(text, ["?", "!", "."]) == (" one", True)
    assert cut_at_stop(text, ["?", "!"]) == (" one. two", True)
    assert cut_at_stop(text, ["?", "nope"]) == (" one. two! three", True)


def test_an_empty_stop_string_is_ignored() -> None:
    # "".find("") would be 0 and cut everything.
    assert cut_at_stop(" abc", [""]) == (" abc", False)
    assert cut_at_stop(" abc. def", ["", "."]) == (" abc", True)


def test_a_stop_at_position_zero_leaves_an_empty_reply() -> None:
    assert cut_at_stop("\n\nHuman: hi", ["\n\nHuman:"]) == ("", True)
    assert cut_at_stop("!!", ["!"]) == ("", True)


def test_only_the_first_occurrence_counts() -> None:
    assert cut_at_stop("a.b.c", ["."]) == ("a", True)
