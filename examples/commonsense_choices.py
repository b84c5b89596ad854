"""Turn the published commonsense data sets into the question/choices format.

The published MoA / LLM-Adapters commonsense files (e.g. DCDmllm/MoA's
datasets/math_commonsense/ARC-Challenge/train.json) ask for an answer label:

    {"instruction": "Please choose the correct answer to the question: Q\\n\\nAnswer1: a
     Answer2: b ...\\n\\nAnswer format: answer1/answer2/...", "input": "",
     "output": "the correct answer is answer2", "answer": "answer2"}

`moa train` and `moa evaluate` read that form as it is (multiple choice over the labels
"answer1".."answerN"). This script writes the same questions as {"question": "Q",
"choices": ["a", "b", ...], "answer": 1}, so that training targets and scores are the
choices' text, as LM evaluation harnesses score ARC and OpenBookQA (a small model knows
the text of an answer long before it knows a label's number). True/false sets (BoolQ) get
the choices ["true", "false"].

    python examples/commonsense_choices.py IN.json OUT.jsonl

OUT must not exist (nothing is overwritten) and must not be IN. A record whose options
repeat one text cannot be scored (the tie would decide it): it is left out, and its number
is printed. Any other record this script cannot read ends it with the record's number and
what was wrong; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_LEAD = re.compile(r"^\s*Please (?:choose the correct answer to|answer) the (?:following )?"
                   r"question(?: with true or false)?,?(?: question)?:\s*", re.IGNORECASE)
_OPTION = re.compile(r"\bAnswer(\d+):\s*")
_FORMAT = re.compile(r"\n\s*Answer format:.*$", re.IGNORECASE | re.DOTALL)


class DuplicateChoices(ValueError):
    """A record whose options repeat one text."""


def convert_record(record: dict, where: str) -> dict:
    """One published commonsense record as {"question", "choices", "answer": index}."""
    instruction, answer = record.get("instruction"), record.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError(f"{where}: needs string fields 'instruction' and 'answer'")
    body = _FORMAT.sub("", _LEAD.sub("", instruction)).strip()
    parts = _OPTION.split(body)
    if len(parts) == 1:  # no Answer1: ... list: a true/false question
        choices = ["true", "false"]
        if answer.strip().lower() not in choices:
            raise ValueError(f"{where}: no 'AnswerK:' options, and 'answer' {answer!r} is not "
                             "true or false")
        return {"question": body, "choices": choices,
                "answer": choices.index(answer.strip().lower())}
    question, numbers, texts = parts[0].strip(), parts[1::2], parts[2::2]
    if [int(n) for n in numbers] != list(range(1, len(numbers) + 1)):
        raise ValueError(f"{where}: options are numbered {numbers}, expected 1..N in order")
    choices = [text.strip() for text in texts]
    if not question or any(not c for c in choices):
        raise ValueError(f"{where}: an empty question or option")
    if len(set(choices)) != len(choices):
        raise DuplicateChoices(f"{where}: two options have the same text: {choices}")
    found = re.fullmatch(r"answer(\d+)", answer.strip().lower())
    if found is None or not 1 <= int(found.group(1)) <= len(choices):
        raise ValueError(f"{where}: 'answer' {answer!r} is not one of answer1.."
                         f"answer{len(choices)}")
    return {"question": question, "choices": choices, "answer": int(found.group(1)) - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a published commonsense JSON file")
    parser.add_argument("target", type=Path, help="the JSONL file to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.target.exists() or args.target.resolve() == args.source.resolve():
            raise ValueError(f"{args.target} exists (or is the input); name a new file")
        records = json.loads(args.source.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{args.source} holds no JSON list of records")
        converted, left_out = [], []
        for number, record in enumerate(records, 1):
            try:
                converted.append(convert_record(record, f"{args.source}: record {number}"))
            except DuplicateChoices:
                left_out.append(number)
        args.target.parent.mkdir(parents=True, exist_ok=True)
        partial = args.target.with_name(args.target.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in converted), encoding="utf-8")
        partial.replace(args.target)
    except (OSError, ValueError) as error:
        print(f"commonsense_choices: error: {error}", file=sys.stderr)
        return 1
    print(f"{len(converted)} records written to {args.target}"
          + (f"; {len(left_out)} left out, their options repeat a text (records "
             f"{', '.join(map(str, left_out))})" if left_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
