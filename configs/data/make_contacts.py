"""Build ``contacts.jsonl``: the example task of ``configs/smollm2.yaml`` (alpaca rows, deterministic).

Each row asks the model to turn a sentence about a person into a one-line JSON record with a fixed key
order, e.g. ``Meet Ana, 34, from Lisbon.`` -> ``{"name": "Ana", "age": 34, "city": "Lisbon"}``. An
instruct model understands the request but does not answer in exactly this format, so exact match
measures what fine-tuning taught it. Run ``python configs/data/make_contacts.py`` to rebuild the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe",
         "Amara", "Bruno", "Carmen", "Dmitri", "Erik", "Fatima", "Gustav", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Toronto", "Lima", "Seoul", "Dublin", "Cairo", "Madrid", "Hanoi", "Prague",
          "Denver", "Accra", "Vienna", "Porto", "Quito", "Berlin", "Manila", "Austin", "Krakow", "Osaka", "Tunis"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, {age}, from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "Our new colleague {name} is based in {city} and just turned {age}.",
    "At {age}, {name} still enjoys every morning walk in {city}.",
    "Born and raised in {city}, {name} is now {age}.",
]
INSTRUCTION = "Extract the person's name, age and city from the text as JSON."
ROWS = 400
SEED = 7


def build_rows(count: int = ROWS, seed: int = SEED) -> list[dict[str, str]]:
    """``count`` distinct alpaca rows (instruction, input, output)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(19, 78)
        text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        if text in seen:
            continue
        seen.add(text)
        record = json.dumps({"name": name, "age": age, "city": city})
        rows.append({"instruction": INSTRUCTION, "input": text, "output": record})
    return rows


if __name__ == "__main__":
    target = Path(__file__).with_name("contacts.jsonl")
    target.write_text("".join(json.dumps(row) + "\n" for row in build_rows()))
    print(f"wrote {ROWS} rows to {target}")
