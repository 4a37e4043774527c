"""Writes the bundled instruction dataset, keras_gemma2_instructions.

    python scripts/make_instructions.py

A glossary of made-up words, written for this project (no outside text):
each of 60 invented words means one ordinary thing (a colour, an animal, a
tool, a food, ...). Training prompts ask about a word in five phrasings;
the test split asks in two phrasings never seen in training, so a
fine-tuned model has to have learned the words, not the sentences. A model
that was never told the glossary cannot answer (the words are random
syllables). Deterministic: the same file on every run.
"""

import json
import os
import random

ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "keras_gemma2",
    "datasets",
    "instructions",
)
SYLLABLES = [
    "bla",
    "dor",
    "fen",
    "gri",
    "kal",
    "lum",
    "mip",
    "nox",
    "pel",
    "quo",
    "ras",
    "sib",
    "tor",
    "vak",
    "wim",
    "zel",
    "bru",
    "cav",
    "dap",
    "fli",
]
MEANINGS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "cat",
    "dog",
    "horse",
    "fish",
    "bird",
    "mouse",
    "sheep",
    "goat",
    "hammer",
    "spoon",
    "knife",
    "rope",
    "ladder",
    "bucket",
    "needle",
    "brush",
    "bread",
    "apple",
    "cheese",
    "rice",
    "soup",
    "honey",
    "milk",
    "salt",
    "river",
    "mountain",
    "forest",
    "desert",
    "island",
    "lake",
    "valley",
    "cave",
    "winter",
    "summer",
    "morning",
    "evening",
    "storm",
    "rain",
    "snow",
    "wind",
    "king",
    "doctor",
    "farmer",
    "sailor",
    "teacher",
    "baker",
    "singer",
    "soldier",
    "book",
    "letter",
    "song",
    "map",
]
TRAIN_TEMPLATES = [
    "What does the word {word} mean?",
    "Define {word}.",
    "In the glossary, {word} means what?",
    "Tell me the meaning of {word}.",
    "{word}: what is it?",
]
TEST_TEMPLATES = [
    "What is the meaning of the word {word}?",
    "Explain the word {word}.",
]


def words(count, rng):
    seen = set()
    while len(seen) < count:
        word = "".join(rng.sample(SYLLABLES, 2))
        seen.add(word)
    return sorted(seen)


def main():
    rng = random.Random(2026)
    glossary = dict(zip(words(len(MEANINGS), rng), MEANINGS))
    splits = {"train": TRAIN_TEMPLATES, "test": TEST_TEMPLATES}
    os.makedirs(ROOT, exist_ok=True)
    for split, templates in splits.items():
        rows = [
            {"prompt": t.format(word=w), "response": m}
            for w, m in glossary.items()
            for t in templates
        ]
        rng.shuffle(rows)
        path = os.path.join(ROOT, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
