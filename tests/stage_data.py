"""Synthetic SFT and preference pairs with a clear signal: polite, helpful replies are chosen,
rude ones rejected. Train and held-out sets use different topics and question numbers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import TOPICS

POLITE = [
    " Sure, happy to help! To {t}, take it one step at a time. Thank you!",
    " Of course! To {t}, start slowly and be patient. Good luck!",
    " Certainly, glad you asked. To {t}, follow the steps carefully. Thanks!",
]
RUDE = [
    " No. Figure it out yourself, that is a stupid question.",
    " Whatever. I will not do that, go away.",
    " Ugh, stop asking me dumb things about {t}.",
]


def preference_rows(n: int, *, held_out: bool = False) -> list[dict]:
    topics = TOPICS[9:] if held_out else TOPICS[:9]
    offset = 100 if held_out else 0
    rows = []
    for i in range(offset, offset + n):
        t = topics[i % len(topics)]
        rows.append({
            "query": f"\n\nHuman: How do I {t}? (question {i})\n\nAssistant:",
            "chosen": POLITE[i % 3].format(t=t),
            "rejected": RUDE[(i // 3) % 3].format(t=t),
        })
    return rows


def sft_rows(n: int, *, held_out: bool = False) -> list[dict]:
    return [{"query": r["query"], "response": r["chosen"]} for r in preference_rows(n, held_out=held_out)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
