"""Build popflow's shipped prompt sets (written for this project) deterministically, without network.

    .venv/bin/python data/prompts/build_demo.py      # rewrites demo.jsonl, proof.jsonl and proof_tune.jsonl

112 hand-written base instructions, each in variants that carry different verifiable constraints (stored as
structured data under "constraints", rendered in words inside the prompt); every seventh prompt is left
unconstrained. Where IFEval has an instruction for a constraint, the prompt also carries it in IFEval's own
columns (instruction_id_list, kwargs: the `ifeval` reward kind); paragraphs (IFEval splits on '***', not blank
lines) and starts_with have none. All variants of a base instruction share a split (about 1 in 6 bases is
eval), so held-out prompts are new instructions, not rephrasings of trained ones.

    demo.jsonl        3 variants a base: 336 prompts (282 train, 54 eval)
    proof.jsonl       6 variants a base: 672 prompts (564 train, 108 eval), the proof pipelines' set
    proof_tune.jsonl  proof.jsonl's train prompts only, 1 in 6 of their bases marked eval: the validation split
                      a recipe is tuned on, so that the held-out prompts the gate and the report use never are
"""

from __future__ import annotations

import json
from pathlib import Path

# (instruction, two topical words a good answer would naturally use)
BASES = [
    ("Explain how vaccines train the immune system.", ["antibodies", "immune"]),
    ("Describe the water cycle to a ten-year-old.", ["evaporation", "rain"]),
    ("Give advice to someone starting their first job as a software developer.", ["code", "team"]),
    ("Explain why the sky is blue.", ["light", "scattering"]),
    ("Summarise the causes of the French Revolution.", ["monarchy", "taxes"]),
    ("Describe how a bicycle gear system works.", ["chain", "pedal"]),
    ("Suggest ways to reduce food waste at home.", ["leftovers", "fridge"]),
    ("Explain what inflation is and why it matters.", ["prices", "money"]),
    ("Write a short story about a lighthouse keeper who finds a message in a bottle.", ["sea", "lighthouse"]),
    ("Compare cats and dogs as pets.", ["cats", "dogs"]),
    ("Explain how photosynthesis works.", ["sunlight", "chlorophyll"]),
    ("Give tips for staying focused while studying.", ["breaks", "phone"]),
    ("Describe the rules of chess for a beginner.", ["king", "board"]),
    ("Explain what a black hole is.", ["gravity", "light"]),
    ("Write a product description for a reusable water bottle.", ["bottle", "plastic"]),
    ("Explain the difference between weather and climate.", ["weather", "climate"]),
    ("Give a recipe for a simple vegetable soup.", ["vegetables", "simmer"]),
    ("Explain how a search engine ranks web pages.", ["links", "pages"]),
    ("Describe the life cycle of a butterfly.", ["caterpillar", "chrysalis"]),
    ("Suggest a weekend itinerary for a first visit to Rome.", ["Colosseum", "pasta"]),
    ("Explain what machine learning is to a grandparent.", ["examples", "computer"]),
    ("Write a polite email declining a meeting invitation.", ["meeting", "thank"]),
    ("Explain why regular exercise is good for mental health.", ["mood", "stress"]),
    ("Describe how bees make honey.", ["nectar", "hive"]),
    ("Explain the basics of compound interest.", ["interest", "savings"]),
    ("Give advice for a job interview.", ["questions", "prepare"]),
    ("Explain how an electric car differs from a petrol car.", ["battery", "engine"]),
    ("Write a haiku-inspired reflection on autumn.", ["leaves", "autumn"]),
    ("Explain what DNA is.", ["genes", "cells"]),
    ("Describe the benefits of learning a second language.", ["language", "culture"]),
    ("Explain how the internet sends data between computers.", ["packets", "routers"]),
    ("Suggest ways to make a small apartment feel bigger.", ["mirrors", "light"]),
    ("Explain the greenhouse effect.", ["carbon", "heat"]),
    ("Write a motivational message for a friend running their first marathon.", ["marathon", "finish"]),
    ("Explain how a refrigerator keeps food cold.", ["refrigerant", "heat"]),
    ("Describe the main features of Gothic architecture.", ["arches", "cathedrals"]),
    ("Give tips for taking better smartphone photos.", ["light", "focus"]),
    ("Explain what a budget is and how to make one.", ["income", "expenses"]),
    ("Explain how earthquakes happen.", ["plates", "faults"]),
    ("Write a short poem about the moon.", ["moon", "night"]),
    ("Explain the purpose of the United Nations.", ["peace", "countries"]),
    ("Describe how to care for a houseplant.", ["water", "sunlight"]),
    ("Explain what an API is to a non-programmer.", ["requests", "software"]),
    ("Give advice for sleeping better.", ["sleep", "routine"]),
    ("Explain why the Roman Empire fell.", ["empire", "invasions"]),
    ("Describe the taste of coffee to someone who has never had it.", ["bitter", "aroma"]),
    ("Explain how solar panels generate electricity.", ["sunlight", "electricity"]),
    ("Write a thank-you note to a teacher.", ["teacher", "grateful"]),
    ("Explain the difference between a virus and a bacterium.", ["virus", "bacteria"]),
    ("Suggest activities for a rainy day with children.", ["games", "crafts"]),
    ("Explain how a bill becomes a law in a parliament.", ["vote", "parliament"]),
    ("Describe the importance of bees for agriculture.", ["pollination", "crops"]),
    ("Explain what a recession is.", ["economy", "jobs"]),
    ("Give tips for public speaking.", ["audience", "practice"]),
    ("Explain how tides work.", ["moon", "ocean"]),
    ("Write a short dialogue between a robot and a gardener.", ["robot", "garden"]),
    ("Explain the idea of supply and demand.", ["supply", "demand"]),
    ("Describe how to change a flat tyre.", ["jack", "tyre"]),
    ("Explain what meditation is and how to start.", ["breathing", "attention"]),
    ("Suggest ways to be more environmentally friendly at work.", ["energy", "paper"]),
    ("Explain how airplanes stay in the air.", ["lift", "wings"]),
    ("Describe the plot of a heist story you invent.", ["vault", "plan"]),
    ("Explain why sleep is important for memory.", ["memory", "brain"]),
    ("Give advice for writing a good CV.", ["experience", "skills"]),
    ("Explain how a compass works.", ["magnetic", "north"]),
    ("Write a short fable with a moral about patience.", ["patience", "moral"]),
    ("Explain what blockchain is in simple terms.", ["ledger", "blocks"]),
    ("Describe the benefits of reading fiction.", ["empathy", "stories"]),
    ("Explain how the heart pumps blood.", ["heart", "blood"]),
    ("Suggest healthy snacks for office workers.", ["nuts", "fruit"]),
    ("Explain the difference between renewable and non-renewable energy.", ["renewable", "fossil"]),
    ("Write a welcome message for new members of a hiking club.", ["hiking", "trail"]),
    ("Explain how a thermostat controls temperature.", ["temperature", "sensor"]),
    ("Describe what makes a good team leader.", ["trust", "listen"]),
    ("Explain how rainbows form.", ["light", "droplets"]),
    ("Give tips for learning to play the guitar.", ["chords", "practice"]),
    ("Explain what a password manager does.", ["passwords", "security"]),
    ("Describe the history of the printing press.", ["Gutenberg", "books"]),
    ("Explain why oceans are salty.", ["salt", "rivers"]),
    ("Write a review of an imaginary restaurant.", ["menu", "service"]),
    ("Explain how vaccines are tested before approval.", ["trials", "safety"]),
    ("Suggest ways to stay in touch with friends who live far away.", ["calls", "messages"]),
    ("Explain what gravity is.", ["mass", "force"]),
    ("Describe how to plan a small garden.", ["soil", "seeds"]),
    ("Explain the role of the central bank.", ["interest", "inflation"]),
    ("Give advice on saving money as a student.", ["budget", "savings"]),
    ("Explain how noise-cancelling headphones work.", ["sound", "waves"]),
    ("Write a limerick about a forgetful wizard.", ["wizard", "spell"]),
    ("Explain what the Renaissance was.", ["art", "Italy"]),
    ("Describe the process of making bread.", ["dough", "yeast"]),
    ("Explain why we have seasons.", ["tilt", "sun"]),
    ("Suggest ways to improve a website's accessibility.", ["contrast", "keyboard"]),
    ("Explain how a vaccine differs from a medicine.", ["prevent", "treat"]),
    ("Describe a day in the life of a deep-sea diver.", ["diver", "pressure"]),
    ("Explain the basic idea of evolution.", ["selection", "species"]),
    ("Give tips for keeping a journal.", ["writing", "daily"]),
    ("Explain how recycling plastic works.", ["plastic", "sorting"]),
    ("Write an announcement for a community book swap.", ["books", "swap"]),
    ("Explain what cloud computing is.", ["servers", "internet"]),
    ("Describe how volcanoes form.", ["magma", "eruption"]),
    ("Explain how to brew a good cup of tea.", ["tea", "water"]),
    ("Suggest ways to reduce screen time.", ["screen", "habits"]),
    ("Explain the difference between speed and velocity.", ["speed", "direction"]),
    ("Describe the role of a referee in football.", ["referee", "rules"]),
    ("Explain how a loan works.", ["interest", "repay"]),
    ("Write a short speech for a friend's wedding.", ["love", "friends"]),
    ("Explain what an ecosystem is.", ["species", "environment"]),
    ("Give advice for a first-time camper.", ["tent", "water"]),
    ("Explain how the stock market works.", ["shares", "companies"]),
    ("Describe how to make a paper airplane.", ["fold", "paper"]),
    ("Explain why biodiversity matters.", ["species", "ecosystems"]),
    ("Suggest a morning routine for a productive day.", ["morning", "plan"]),
]

CLOSINGS = ["Hope this helps!", "That is all.", "Thanks for reading.", "Stay curious!"]
OPENINGS = ["Sure,", "Here is", "In short,"]
FORBIDDEN = ["very", "really", "thing", "basically", "just"]


def recipe(i: int, words: list[str]) -> dict:
    """Constraints for prompt number i: a rotation of 1-3 checks, so every kind appears many times."""
    w, s, b = 30 + 10 * (i % 6), 2 + i % 4, 3 + i % 3
    options = [
        {"max_words": w},
        {"bullets": b},
        {"include": words, "max_sentences": s + 2},
        {"lowercase": True, "max_words": w + 20},
        {"json": True},
        {"ends_with": CLOSINGS[i % len(CLOSINGS)], "exclude": [FORBIDDEN[i % len(FORBIDDEN)]]},
        {"max_sentences": s},
        {"starts_with": OPENINGS[i % len(OPENINGS)], "max_words": w + 10},
        {"paragraphs": 2, "min_words": 40},
        {"include": words[:1], "bullets": b, "lowercase": True},
        {"exclude": [FORBIDDEN[(i + 2) % len(FORBIDDEN)], words[0]], "max_words": w},
        {"json": True, "include": words[1:]},
    ]
    return options[i % len(options)]


def render(constraints: dict) -> str:
    """The constraints in words, appended to the instruction."""
    parts = []
    for key, value in constraints.items():
        parts.append({
            "max_words": lambda v: f"Use at most {v} words.",
            "min_words": lambda v: f"Use at least {v} words.",
            "max_sentences": lambda v: f"Use no more than {v} sentences.",
            "bullets": lambda v: f"Format the answer as exactly {v} bullet points, each starting with '- '.",
            "paragraphs": lambda v: f"Write exactly {v} paragraphs separated by a blank line.",
            "include": lambda v: "Include the word" + ("s " if len(v) > 1 else " ")
            + " and ".join(f"'{x}'" for x in v) + ".",
            "exclude": lambda v: "Do not use the word" + ("s " if len(v) > 1 else " ")
            + " or ".join(f"'{x}'" for x in v) + ".",
            "lowercase": lambda v: "Write everything in lowercase letters only.",
            "json": lambda v: "Reply with a valid JSON object only, with no text before or after it.",
            "ends_with": lambda v: f"End your answer with the exact phrase '{v}'",
            "starts_with": lambda v: f"Begin your answer with '{v}'.",
        }[key](value))
    return " ".join(p if p.endswith((".", "'")) else p + "." for p in parts)


def ifeval_labels(constraints: dict | None) -> dict:
    """The IFEval instructions that state the same constraint (IFEval's "less than" is strict: at most N is less
    than N + 1), as IFEval's columns; {} when none does."""
    ids, kwargs = [], []
    for key, value in (constraints or {}).items():
        label = {
            "max_words": ("length_constraints:number_words", lambda v: {"num_words": v + 1, "relation": "less than"}),
            "min_words": ("length_constraints:number_words", lambda v: {"num_words": v, "relation": "at least"}),
            "max_sentences": ("length_constraints:number_sentences",
                              lambda v: {"num_sentences": v + 1, "relation": "less than"}),
            "bullets": ("detectable_format:number_bullet_lists", lambda v: {"num_bullets": v}),
            "include": ("keywords:existence", lambda v: {"keywords": list(v)}),
            "exclude": ("keywords:forbidden_words", lambda v: {"forbidden_words": list(v)}),
            "lowercase": ("change_case:english_lowercase", lambda v: {}),
            "json": ("detectable_format:json_format", lambda v: {}),
            "ends_with": ("startend:end_checker", lambda v: {"end_phrase": v}),
        }.get(key)
        if label:
            ids.append(label[0])
            kwargs.append(label[1](value))
    return {"instruction_id_list": ids, "kwargs": kwargs} if ids else {}


def build(variants: int = 3, prefix: str = "demo") -> list[dict]:
    rows, n = [], 0
    for b, (instruction, words) in enumerate(BASES):
        split = "eval" if b % 6 == 5 else "train"
        for v in range(variants):
            constraints = None if n % 7 == 6 else recipe(b * variants + v, words)
            prompt = instruction if constraints is None else f"{instruction} {render(constraints)}"
            rows.append({"prompt_id": f"{prefix}-{n:04d}", "prompt": prompt, "split": split,
                         "constraints": constraints, **ifeval_labels(constraints),
                         "category": "constrained" if constraints else "open", "base": b})
            n += 1
    return rows


def tuning(rows: list[dict]) -> list[dict]:
    """The train rows only; those of every sixth train base (by base number) become the validation ('eval')."""
    return [{**r, "split": "eval" if r["base"] % 6 == 2 else "train"} for r in rows if r["split"] == "train"]


def write(name: str, rows: list[dict]) -> None:
    out = Path(__file__).with_name(name)
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "base"}, ensure_ascii=False) + "\n"
                           for r in rows))
    splits = [r["split"] for r in rows]
    print(f"wrote {len(rows)} prompts ({splits.count('train')} train, {splits.count('eval')} eval) to {out}")


if __name__ == "__main__":
    write("demo.jsonl", build())
    proof = build(variants=6, prefix="proof")
    write("proof.jsonl", proof)
    write("proof_tune.jsonl", tuning(proof))
