"""Write a small multiple-choice science dataset for `moa train` and `moa evaluate`.

Templated questions over a fixed set of grade-school facts (animal classes, SI units,
chemical symbols, organs, planets, rock types, states of matter, energy conversions,
magnets and conductors), each with 4 choices: the right one and 3 distractors drawn from
the other answers of the same template, in a shuffled order. Train and test records are
different draws (no test record repeats a training record's question with the same
choices), so the test measures what training taught about the facts and the format, not
recall of identical records; some facts are drawn for the test only.

    python examples/science_mc.py --out data/science        # train.jsonl 320, test.jsonl 200
    python examples/science_mc.py --format published ...    # the published commonsense form

Formats: "mc" writes {"question", "choices", "answer": index}; "published" writes the
LLM-Adapters commonsense form ({"instruction" listing Answer1..Answer4 and an "Answer
format" line, "input": "", "output": "the correct answer is answerK", "answer": "answerK"}).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = {
    "mammal": ["whale", "bat", "dolphin", "elephant", "horse", "rabbit", "tiger", "mouse"],
    "bird": ["eagle", "penguin", "sparrow", "ostrich", "owl", "parrot", "swan", "robin"],
    "fish": ["salmon", "trout", "shark", "tuna", "cod", "goldfish", "carp", "herring"],
    "reptile": ["lizard", "snake", "crocodile", "turtle", "iguana", "gecko", "tortoise",
                "alligator"],
    "amphibian": ["frog", "toad", "salamander", "newt", "axolotl", "caecilian"],
    "insect": ["ant", "beetle", "butterfly", "bee", "mosquito", "grasshopper", "wasp",
               "dragonfly"],
}
UNITS = {"force": "newton", "energy": "joule", "power": "watt", "electric current": "ampere",
         "electrical resistance": "ohm", "frequency": "hertz", "pressure": "pascal",
         "electric charge": "coulomb", "voltage": "volt", "mass": "kilogram",
         "length": "metre", "time": "second", "temperature": "kelvin"}
SYMBOLS = {"oxygen": "O", "hydrogen": "H", "iron": "Fe", "sodium": "Na", "gold": "Au",
           "silver": "Ag", "copper": "Cu", "potassium": "K", "carbon": "C", "nitrogen": "N",
           "helium": "He", "calcium": "Ca", "lead": "Pb", "tin": "Sn", "mercury": "Hg",
           "chlorine": "Cl", "sulfur": "S", "zinc": "Zn"}
ORGANS = {"pumps blood around the body": "heart", "takes oxygen from the air": "lungs",
          "filters waste from the blood": "kidneys", "controls the nervous system": "brain",
          "breaks down food with acid": "stomach", "makes bile": "liver",
          "absorbs most nutrients from food": "small intestine",
          "covers and protects the body": "skin"}
PLANETS = {"is closest to the Sun": "Mercury", "is the largest in the solar system": "Jupiter",
           "is known as the red planet": "Mars", "has the most visible rings": "Saturn",
           "is the hottest in the solar system": "Venus",
           "is farthest from the Sun": "Neptune", "do humans live on": "Earth",
           "rotates on its side": "Uranus"}
ROCKS = {"granite": "igneous", "basalt": "igneous", "obsidian": "igneous",
         "pumice": "igneous", "sandstone": "sedimentary", "limestone": "sedimentary",
         "shale": "sedimentary", "chalk": "sedimentary", "marble": "metamorphic",
         "slate": "metamorphic", "quartzite": "metamorphic", "gneiss": "metamorphic"}
ROCK_KINDS = ["igneous", "sedimentary", "metamorphic", "volcanic glass"]
STATES = {"water": "liquid", "ice": "solid", "steam": "gas", "oxygen": "gas",
          "iron": "solid", "mercury": "liquid", "salt": "solid", "helium": "gas",
          "milk": "liquid", "wood": "solid", "carbon dioxide": "gas", "olive oil": "liquid"}
STATE_KINDS = ["solid", "liquid", "gas", "plasma"]
DEVICES = {"light bulb": "light", "loudspeaker": "sound", "electric heater": "heat",
           "electric motor": "motion", "toaster": "heat", "electric fan": "motion",
           "doorbell": "sound", "lamp": "light"}
ENERGY_KINDS = ["light", "sound", "heat", "motion", "chemical energy"]
MAGNETIC = ["iron", "nickel", "steel", "cobalt"]
NOT_MAGNETIC = ["wood", "plastic", "glass", "copper", "rubber", "paper", "aluminium",
                "cotton"]
CONDUCTORS = ["copper", "silver", "aluminium", "gold"]
INSULATORS = ["rubber", "glass", "wood", "plastic", "cotton", "paper", "ceramic", "wool"]


def _draw(rng: random.Random, question: str, right: str, pool: list[str]) -> dict:
    wrong = rng.sample(sorted(set(pool) - {right}), 3)
    choices = wrong + [right]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def question(rng: random.Random) -> dict:
    """One random multiple-choice record from a random template."""
    kind = rng.randrange(10)
    if kind == 0:
        group = rng.choice(sorted(ANIMALS))
        right = rng.choice(ANIMALS[group])
        others = [a for g, members in ANIMALS.items() if g != group for a in members]
        article = "an" if group[0] in "aeiou" else "a"
        return _draw(rng, f"Which of these animals is {article} {group}?", right,
                     others + [right])
    if kind == 1:
        quantity = rng.choice(sorted(UNITS))
        return _draw(rng, f"What is the SI unit of {quantity}?", UNITS[quantity],
                     list(UNITS.values()))
    if kind == 2:
        element = rng.choice(sorted(SYMBOLS))
        return _draw(rng, f"What is the chemical symbol for {element}?", SYMBOLS[element],
                     list(SYMBOLS.values()))
    if kind == 3:
        function = rng.choice(sorted(ORGANS))
        return _draw(rng, f"Which organ {function}?", ORGANS[function], list(ORGANS.values()))
    if kind == 4:
        property_ = rng.choice(sorted(PLANETS))
        return _draw(rng, f"Which planet {property_}?", PLANETS[property_],
                     list(PLANETS.values()))
    if kind == 5:
        rock = rng.choice(sorted(ROCKS))
        return _draw(rng, f"What type of rock is {rock}?", ROCKS[rock], ROCK_KINDS)
    if kind == 6:
        substance = rng.choice(sorted(STATES))
        return _draw(rng, f"At room temperature, what state of matter is {substance}?",
                     STATES[substance], STATE_KINDS)
    if kind == 7:
        device = rng.choice(sorted(DEVICES))
        return _draw(rng, f"A {device} mainly turns electrical energy into what?",
                     DEVICES[device], ENERGY_KINDS)
    if kind == 8:
        right = rng.choice(MAGNETIC)
        wrong = rng.sample(NOT_MAGNETIC, 3)
        return _draw(rng, "Which material is attracted to a magnet?", right, wrong + [right])
    right = rng.choice(CONDUCTORS)
    wrong = rng.sample(INSULATORS, 3)
    return _draw(rng, "Which material conducts electricity best?", right, wrong + [right])


def published(record: dict) -> dict:
    """A record in the published commonsense form (LLM-Adapters' ARC layout)."""
    options = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(record["choices"]))
    labels = "/".join(f"answer{i + 1}" for i in range(len(record["choices"])))
    answer = f"answer{record['answer'] + 1}"
    return {"instruction": f"Please choose the correct answer to the question: "
                           f"{record['question']}\n\n{options}\n\nAnswer format: {labels}",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def make_dataset(train: int, test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`train` and `test` distinct records (no record in both, none repeated)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < train + test:
        record = question(rng)
        key = json.dumps([record["question"], sorted(record["choices"])])
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records[:train], records[train:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="science-data", help="output directory")
    parser.add_argument("--train", type=int, default=320, help="training records")
    parser.add_argument("--test", type=int, default=200, help="test records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--format", choices=("mc", "published"), default="mc",
                        help="mc: question/choices/answer; published: the commonsense form")
    args = parser.parse_args(argv)
    train, test = make_dataset(args.train, args.test, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.jsonl", train), ("test.jsonl", test)):
        if args.format == "published":
            records = [published(r) for r in records]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records),
                                encoding="utf-8")
    print(f"wrote {len(train)} training and {len(test)} test records to {out}/")


if __name__ == "__main__":
    main()
