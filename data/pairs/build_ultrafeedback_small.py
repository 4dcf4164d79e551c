"""Build data/pairs/ultrafeedback_small.jsonl: a small preference set in UltraFeedback's binarized layout.

    .venv/bin/python data/pairs/build_ultrafeedback_small.py

Written for popflow's imported-pairs path (pipeline `imported`): 12 prompts, each with a strong, a middling
and a weak answer scored on UltraFeedback's 1-10 scale, paired three ways (strong/weak, strong/middling,
middling/weak) so preference strengths differ. Rows: prompt, prompt_id, chosen and rejected as full
conversations (user turn + assistant turn), score_chosen, score_rejected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ITEMS = [
    ("What causes the seasons on Earth?",
     ("The tilt of Earth's axis (about 23.5 degrees) makes each hemisphere lean toward the Sun for part of the "
      "year, so sunlight arrives more directly and days are longer: that is summer.", 9.0),
     ("Earth's tilt changes how much sunlight each hemisphere gets.", 6.5),
     ("Because Earth is closer to the Sun in summer.", 2.0)),
    ("How do I boil an egg so the yolk stays soft?",
     ("Lower the egg into boiling water, cook 6 to 7 minutes, then move it to ice water for a minute.", 8.5),
     ("Boil it for a few minutes.", 5.0),
     ("Boil it for 20 minutes.", 1.5)),
    ("Translate 'good morning' into French.", ("'Bonjour' is the usual greeting in the morning.", 9.5),
     ("Bonjour.", 7.0), ("Bonsoir.", 2.5)),
    ("Give one tip for writing a clear email.",
     ("Put the request in the first sentence, then add only the context the reader needs to act.", 8.0),
     ("Keep it short.", 5.5), ("Use lots of attachments.", 2.0)),
    ("What is 15% of 80?", ("15% of 80 is 0.15 x 80 = 12.", 10.0), ("It is 12.", 8.0), ("It is 15.", 1.0)),
    ("Why do cats purr?",
     ("Cats purr when content, but also to soothe themselves when stressed or hurt; the vibration comes from "
      "the larynx muscles.", 8.5),
     ("Usually because they are happy.", 6.0), ("Cats purr to scare dogs.", 2.0)),
    ("Name a renewable source of energy.", ("Solar power: sunlight is converted to electricity by panels.", 9.0),
     ("Wind.", 7.0), ("Coal.", 1.0)),
    ("How can I fall asleep faster?",
     ("Keep a fixed bedtime, dim screens an hour before, and keep the room cool and dark.", 8.5),
     ("Avoid your phone at night.", 6.0), ("Drink coffee before bed.", 1.5)),
    ("What does HTML stand for?", ("HyperText Markup Language, the language web pages are written in.", 9.5),
     ("HyperText Markup Language.", 8.5), ("High Tech Modern Language.", 1.0)),
    ("Suggest a name for a friendly robot.", ("Bolt: short, cheerful and easy to say.", 7.5),
     ("Robo.", 5.0), ("Error 404.", 3.0)),
    ("Explain what a noun is.", ("A noun names a person, place, thing or idea, like 'teacher' or 'city'.", 9.0),
     ("A naming word.", 6.5), ("A word that describes an action.", 1.5)),
    ("How many continents are there?",
     ("By the most common convention there are seven: Africa, Antarctica, Asia, Australia, Europe, North "
      "America and South America.", 9.0),
     ("Seven.", 7.5), ("Five.", 3.0)),
]


def turn(prompt: str, answer: str) -> list[dict]:
    return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]


def build() -> list[dict]:
    rows = []
    for prompt, strong, middling, weak in ITEMS:
        pid = hashlib.sha256(prompt.encode()).hexdigest()
        for (c, cs), (r, rs) in ((strong, weak), (strong, middling), (middling, weak)):
            rows.append({"prompt": prompt, "prompt_id": pid, "chosen": turn(prompt, c), "rejected": turn(prompt, r),
                         "messages": turn(prompt, c), "score_chosen": cs, "score_rejected": rs})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("ultrafeedback_small.jsonl")
    rows = build()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {out}")
