"""Data files for `moa train` and `moa evaluate`: reading, record formats, prompts, tokens.

A data file is JSON (a list of records, or an object whose "data" is one) or JSON Lines
(one record per line); every record is a JSON object. Formats, told apart by their fields:

- published (LLM-Adapters / MoA): "instruction", optional "input", "output" (training) and
  "answer" (evaluation), prompted with the Alpaca template below. In evaluation an
  instruction that lists its options ("Answer1: ... Answer2: ...", or an "Answer format:
  answer1/answer2" line, as the published commonsense sets do) with an answer such as
  "answer2" is multiple choice over those labels; a numeric answer (the math sets) is
  arithmetic.
- "prompt" and "completion": the text as given (training); in evaluation "prompt" with
  "choices" and "answer", or with a numeric "answer".
- "question", "choices" (a list of strings) and "answer" (the index of the right choice, or
  its text): multiple choice, prompted "Question: ...\\nAnswer:" and answered " choice" (a
  choice that starts with a space gets no second one). A file whose questions already hold
  that template is wrapped again, with a warning.
- "question" and "answer" (a number, or any text in training): prompted the same way.

Choices must differ (surrounding spaces aside), and a numeric answer must be finite: a
record that breaks either is refused, naming it.

Training computes the loss on the response (completion) tokens only: prompt and response
are tokenized apart and joined, so the boundary is exact, and the end-of-text token closes
the response. Evaluation scores a choice as the log-likelihood of its tokens after the
prompt's, tokenized the same way (a space ending the prompt moves to the choice, as LM
evaluation harnesses do).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
# What the published commonsense training data puts before the answer label
# ("the correct answer is answer2"): the default prefix when a record has no "output".
COMMONSENSE_PREFIX = "the correct answer is "

TRAINING_FORMATS = ("'instruction' and 'output' (optional 'input'), or 'prompt' and "
                    "'completion', or 'question' and 'answer' (optional 'choices')")
EVALUATION_FORMATS = ("'question' (or 'prompt'), 'choices' and 'answer' (multiple choice), "
                      "'question' (or 'prompt') and a numeric 'answer' (arithmetic), or "
                      "'instruction' and 'answer' (optional 'input', 'output'; the published "
                      "format)")

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A question that already holds QUESTION_TEMPLATE (data prepared for another harness).
_TEMPLATED_QUESTION = re.compile(r"\A\s*Question:.*Answer:|Answer:\s*\Z", re.DOTALL)
_OPTION = re.compile(r"\b(Answer|Option|Solution|Ending)(\d+)\s*:", re.IGNORECASE)
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+(?:\s*/\s*\S+)+)", re.IGNORECASE)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the record."""


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

def check_data_file(path: str | os.PathLike) -> Path:
    """`path` as a Path when it names a regular file; FileNotFoundError when nothing is
    there, DataError saying what it is otherwise (a directory, a FIFO, a device, a socket).
    Only the file's type is read (stat), so a FIFO cannot block."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such data file: {str(path)!r}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise DataError(f"{path} is a directory, not a JSON or JSONL data file")
    raise DataError(f"{path} is not a regular file (it is {_file_kind(mode)}); give a JSON "
                    "or JSONL data file")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def _read_regular_file(path: Path) -> bytes:
    # O_NONBLOCK: should the path have become a FIFO since check_data_file, opening it
    # returns at once and fstat refuses it, instead of waiting for a writer.
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path} is not a regular file (it is {_file_kind(mode)}); give "
                            "a JSON or JSONL data file")
        return handle.read()


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON or JSON Lines file, each a dict. FileNotFoundError for a
    missing file; DataError for a path that is not a regular file (check_data_file), text
    that is neither JSON nor JSON Lines, or a record that is not an object."""
    path = check_data_file(path)
    raw = _read_regular_file(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                        f"{error.start}); expected JSON or JSONL records") from None
    if not text.strip():
        raise DataError(f"{path} is empty: no usable record")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _json_lines(path, text)
    else:
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        elif isinstance(data, dict):  # a JSON Lines file of one record
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of "
                        "records (objects) or one record per line")
    for number, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number} is a JSON {_json_type(record)}, not an "
                            "object with fields")
    if not data:
        raise DataError(f"{path} holds no records: no usable record")
    return data


def _json_lines(path: Path, text: str) -> list:
    records = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {line_number} is not JSON ({error.msg} at column "
                            f"{error.colno}); expected a JSON list of records or one JSON "
                            "object per line") from None
    return records


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _text(record: dict, name: str, where: str, formats: str, required: bool = True) -> str:
    if name not in record:
        if not required:
            return ""
        raise DataError(f"{where} has no {name!r} field; allowed records: {formats}")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} is a JSON {_json_type(value)}, expected a "
                        "string")
    return value


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt of the published format (the form without an input section
    when input_text is empty), ending where the response begins."""
    if input_text.strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input_text)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def question_prompt(question: str) -> str:
    """The prompt of "question" records: "Question: ...\\nAnswer:"."""
    return QUESTION_TEMPLATE.format(question=question)


def question_answer(answer: str) -> str:
    """What follows question_prompt: the answer after one space (none added when it starts
    with a space already)."""
    return answer if answer.startswith(" ") else " " + answer


def _template_warnings(path, records: list[dict], is_question, answers) -> list[str]:
    """Lines that warn about "question" records prepared for another harness: questions
    that already hold QUESTION_TEMPLATE, and answers or choices that already start with
    the space that moa puts after "Answer:". is_question(record) tells the records of that
    format; answers(record) gives their answer texts."""
    questions = [r for r in records if is_question(r) and isinstance(r.get("question"), str)]
    templated = sum(bool(_TEMPLATED_QUESTION.search(r["question"])) for r in questions)
    spaced = sum(any(isinstance(a, str) and a.startswith(" ") for a in answers(r))
                 for r in questions)
    lines = []
    if templated:
        lines.append(f"{path}: {templated} of {len(questions)} 'question' records already "
                     "hold the question template ('Question: ... Answer:'), which moa adds "
                     "again ('Question: Question: ...'); give the bare question, or use "
                     "'prompt' records, whose text is used as given")
    if spaced:
        lines.append(f"{path}: {spaced} of {len(questions)} 'question' records have answers "
                     "or choices that start with a space; moa puts one space after "
                     "'Answer:' and adds none to these")
    return lines


def _warn(line: str) -> None:
    warnings.warn(line, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# training records
# ---------------------------------------------------------------------------------------

@dataclass
class Example:
    """One training example: the loss covers the completion only."""

    prompt: str
    completion: str


def training_example(record: dict, where: str) -> Example:
    """The Example of one record (see the module docstring for the formats); DataError
    naming `where` ("data.jsonl: record 3") and the field when a needed field is missing or
    of the wrong type."""
    if "instruction" in record:
        instruction = _text(record, "instruction", where, TRAINING_FORMATS)
        input_text = _text(record, "input", where, TRAINING_FORMATS, required=False)
        return Example(alpaca_prompt(instruction, input_text),
                       _text(record, "output", where, TRAINING_FORMATS))
    if "prompt" in record:
        return Example(_text(record, "prompt", where, TRAINING_FORMATS),
                       _text(record, "completion", where, TRAINING_FORMATS))
    if "question" in record:
        question = _text(record, "question", where, TRAINING_FORMATS)
        if "answer" not in record:
            raise DataError(f"{where} has no 'answer' field; allowed records: "
                            f"{TRAINING_FORMATS}")
        if "choices" in record:
            choices = _choices(record, where)
            answer = choices[_choice_index(record["answer"], choices, where)]
        else:
            answer = _answer_text(record["answer"], where)
        return Example(question_prompt(question), question_answer(answer))
    raise DataError(f"{where} has none of the fields 'instruction', 'prompt', 'question' "
                    f"(it has {_field_list(record)}); allowed records: {TRAINING_FORMATS}")


def _field_list(record: dict) -> str:
    return ", ".join(repr(k) for k in list(record)[:8]) if record else "no fields"


def _answer_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # NaN, Infinity or an overflowing 1e999 in the JSON
            raise DataError(f"{where}: 'answer' is {value}, not a finite number; give a "
                            "finite number or a string")
        return _number_text(value)
    raise DataError(f"{where}: 'answer' is a JSON {_json_type(value)}, expected a string or "
                    "a number")


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def load_training_examples(path: str | os.PathLike,
                           warn: Callable[[str], None] | None = None) -> list[Example]:
    """Every record of `path` as an Example, in file order. warn(line) receives a line for
    each kind of pre-templated "question" record the file holds (default: a UserWarning)."""
    records = read_records(path)
    examples = [training_example(record, f"{path}: record {number}")
                for number, record in enumerate(records, 1)]

    def is_question(record: dict) -> bool:  # training_example's order of formats
        return "instruction" not in record and "prompt" not in record and "question" in record

    def answers(record: dict) -> list:
        return record["choices"] if "choices" in record else [record.get("answer")]

    for line in _template_warnings(path, records, is_question, answers):
        (warn or _warn)(line)
    return examples


# Tokens past those kept that the tokenised piece of a cut text must still hold. Where a
# text is cut, its tokens can differ from the whole text's (a word split in two, a merge
# that lost its partner); this many tokens between the cut and the kept ones keep that
# difference in the part that is dropped anyway.
CUT_MARGIN_TOKENS = 32


def longest_token_chars(tokenizer) -> int:
    """The length of the tokenizer's longest ordinary vocabulary string (special and added
    tokens left out), at least 1: about the most text characters one token stands for (a
    byte-level vocabulary spells a token with one character per byte, so never fewer than
    the characters it covers). tokenize_head's first guess of the piece to tokenise."""
    added = set(getattr(tokenizer, "added_tokens_encoder", {}))
    return max([len(token) for token in tokenizer.get_vocab() if token not in added] + [1])


def tokenize_head(tokenizer, text: str, count: int, add_special_tokens: bool = False,
                  longest: int | None = None) -> list[int]:
    """tokenizer(text)["input_ids"][:count], tokenising only a piece of the text's start,
    so that time and memory grow with `count`, not with len(text).

    The piece is (count + CUT_MARGIN_TOKENS) * longest characters at first, and doubles
    until it gives count + CUT_MARGIN_TOKENS tokens or is the whole text: the tokens kept lie
    CUT_MARGIN_TOKENS tokens or more before the cut, so they are the whole text's (a
    whitespace-dropping tokenizer, whose tokens may stand for more characters, only takes
    more doublings). longest: longest_token_chars(tokenizer), when the caller has it."""
    return _tokenize_cut(tokenizer, text, count, add_special_tokens, longest, from_end=False)


def tokenize_tail(tokenizer, text: str, count: int, add_special_tokens: bool = False,
                  longest: int | None = None) -> list[int]:
    """The last `count` tokens of tokenizer(text)["input_ids"] (all of them when there are
    fewer; none for count 0), tokenising only a piece of the text's end (see
    tokenize_head)."""
    return _tokenize_cut(tokenizer, text, count, add_special_tokens, longest, from_end=True)


def _tokenize_cut(tokenizer, text: str, count: int, add_special_tokens: bool,
                  longest: int | None, from_end: bool) -> list[int]:
    if count <= 0:
        return []
    size = (count + CUT_MARGIN_TOKENS) * (longest or longest_token_chars(tokenizer))
    by_words = size < len(text) and _splits_words(tokenizer)
    while True:
        whole = size >= len(text)
        piece = text if whole else text[len(text) - size:] if from_end else text[:size]
        # verbose=False: a piece longer than the model's positions is no error, it is cut
        encoding = tokenizer(piece, add_special_tokens=add_special_tokens, verbose=False)
        ids = encoding["input_ids"]
        if not whole and by_words:
            ids = _without_cut_word(ids, _word_ids(encoding), from_end)
        if whole or len(ids) >= count + CUT_MARGIN_TOKENS:
            return ids[max(0, len(ids) - count):] if from_end else ids[:count]
        size *= 2


def _word_ids(encoding) -> list[int | None] | None:
    """The pre-tokenized word of each token (None for special tokens), where the tokenizer
    says (fast tokenizers); else None."""
    try:
        return encoding.word_ids()
    except (ValueError, AttributeError):
        return None


def _splits_words(tokenizer) -> bool:
    """Whether the tokenizer says which word each token belongs to and splits "a b" into
    two words (a byte-level tokenizer without a pre-tokenizer does not)."""
    words = _word_ids(tokenizer("a b", add_special_tokens=False))
    return words is not None and len({word for word in words if word is not None}) > 1


def _without_cut_word(ids: list[int], words: list[int | None], from_end: bool) -> list[int]:
    """ids without the tokens of the word the cut falls in (the piece's last word, or its
    first from the end): a word the cut shortens can tokenise to other tokens than the
    whole word, and not only near the cut (WordPiece gives one unknown token for a word
    over its length limit, and the word's pieces when cut below it). A piece within one
    word keeps nothing. For tokenizers that do not split words, CUT_MARGIN_TOKENS alone
    guards the cut."""
    known = {word for word in words if word is not None}
    if len(known) < 2:  # the piece lies within one word: nothing in it is sure
        return []
    cut_word = max(known) if not from_end else min(known)
    if from_end:
        last = max(i for i, word in enumerate(words) if word == cut_word)
        return ids[last + 1:]
    first = min(i for i, word in enumerate(words) if word == cut_word)
    return ids[:first]


@dataclass
class TokenizedExamples:
    """Token features of the usable examples and how many were left out, and why."""

    features: list[dict[str, list[int]]]
    empty_response: int = 0
    no_room: int = 0


def tokenize_examples(tokenizer, examples: list[Example], max_length: int) -> TokenizedExamples:
    """input_ids and labels per example: the prompt's tokens (with the tokenizer's special
    start tokens) labelled -100, then the completion's and the end-of-text token. Past
    max_length the prompt loses tokens from its start (the response and the prompt's end
    matter most), then the response from its end; only the pieces of a long text that can
    be kept are tokenised (tokenize_head, tokenize_tail), so time and memory do not grow
    with a record's length. Examples with an empty response are left out and counted, as
    are those with no response token to predict within max_length (the prompt's special
    tokens fill it, or the response starts the sequence: labels shift by one, so the first
    token is never predicted)."""
    result = TokenizedExamples([])
    eos = tokenizer.eos_token_id
    longest = longest_token_chars(tokenizer)
    for example in examples:
        completion = tokenize_head(tokenizer, example.completion, max_length, longest=longest)
        if not example.completion.strip() or not completion:
            result.empty_response += 1
            continue
        head = tokenize_head(tokenizer, example.prompt, max_length + 1, True, longest)
        special = _leading_special_tokens(tokenizer, head)
        response = completion + [eos]
        room = max_length - len(special)
        if room < 1:
            result.no_room += 1
            continue
        response = response[:room]
        keep = room - len(response)
        if keep <= 0:
            body = []
        elif len(head) <= max_length:  # the whole prompt
            body = head[len(special):][-keep:]
        else:  # over max_length + 1 tokens: its last `keep` follow its special tokens
            body = tokenize_tail(tokenizer, example.prompt, keep, True, longest)
        ids = special + body + response
        labels = [-100] * (len(special) + len(body)) + response
        if all(label == -100 for label in labels[1:]):
            result.no_room += 1
            continue
        result.features.append({"input_ids": ids, "labels": labels})
    return result


def _leading_special_tokens(tokenizer, ids: list[int]) -> list[int]:
    special = set(tokenizer.all_special_ids)
    count = 0
    while count < len(ids) and ids[count] in special:
        count += 1
    return ids[:count]


class SupervisedDataset(torch.utils.data.Dataset):
    """The tokenized examples, as the Trainer reads them."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


class PadCollator:
    """Pads a batch of features on the right: input_ids with pad_id, attention_mask 0 and
    labels -100 on the padding. Returns int64 tensors [batch, longest]."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            mask[row, :length] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------
# evaluation records
# ---------------------------------------------------------------------------------------

@dataclass
class MultipleChoiceItem:
    """Scored by the log-likelihood of each continuation after the context."""

    context: str
    continuations: list[str]
    answer: int
    where: str = field(default="", compare=False)  # "data.jsonl: record 3", for messages


@dataclass
class ArithmeticItem:
    """Answered by greedy generation from the prompt; the last number in the response
    counts (as the published evaluation extracts it)."""

    prompt: str
    answer: float
    where: str = field(default="", compare=False)


def evaluation_item(record: dict, where: str) -> MultipleChoiceItem | ArithmeticItem:
    """The evaluation item of one record (see the module docstring); DataError naming
    `where` and the field when a record cannot be scored."""
    if "instruction" in record:
        return _published_item(record, where)
    if "question" in record:
        context = question_prompt(_text(record, "question", where, EVALUATION_FORMATS))
        continuation = question_answer
    elif "prompt" in record:
        context = _text(record, "prompt", where, EVALUATION_FORMATS)
        continuation = str
    else:
        raise DataError(f"{where} has none of the fields 'question', 'prompt', 'instruction' "
                        f"(it has {_field_list(record)}); allowed records: "
                        f"{EVALUATION_FORMATS}")
    if "answer" not in record:
        raise DataError(f"{where} has no 'answer' field; allowed records: "
                        f"{EVALUATION_FORMATS}")
    if "choices" in record:
        choices = _choices(record, where)
        return MultipleChoiceItem(context, [continuation(c) for c in choices],
                                  _choice_index(record["answer"], choices, where), where)
    number = _finite_number(record["answer"], where)
    if number is None:
        raise DataError(f"{where}: 'answer' {record['answer']!r} is not a number and the "
                        f"record has no 'choices'; allowed records: {EVALUATION_FORMATS}")
    return ArithmeticItem(context, number, where)


def _published_item(record: dict, where: str) -> MultipleChoiceItem | ArithmeticItem:
    instruction = _text(record, "instruction", where, EVALUATION_FORMATS)
    prompt = alpaca_prompt(instruction, _text(record, "input", where, EVALUATION_FORMATS,
                                              required=False))
    if "answer" not in record:
        raise DataError(f"{where} has no 'answer' field; allowed records: "
                        f"{EVALUATION_FORMATS}")
    answer = record["answer"]
    labels = commonsense_labels(instruction)
    if labels:
        _refuse_repeats(labels, where, "the instruction's answer labels")
        if not isinstance(answer, str) or answer.strip().lower() not in labels:
            raise DataError(f"{where}: 'answer' is {answer!r}, but the instruction's options "
                            f"are {', '.join(labels)}")
        output = _text(record, "output", where, EVALUATION_FORMATS, required=False)
        given = answer.strip().lower()
        cut = output.lower().rfind(given)
        prefix = output[:cut] if output and cut >= 0 else COMMONSENSE_PREFIX
        return MultipleChoiceItem(prompt + prefix, labels, labels.index(given), where)
    number = _finite_number(answer, where)
    if number is None:
        raise DataError(f"{where}: 'answer' {answer!r} is neither a number nor one of options "
                        "listed by the instruction (it lists none: no 'Answer1:' ... or "
                        "'Answer format: a/b' line)")
    return ArithmeticItem(prompt, number, where)


def commonsense_labels(instruction: str) -> list[str]:
    """The answer labels an instruction of the published commonsense format lists: those of
    its "Answer format: answer1/answer2/..." line, else "answerK" for each "AnswerK:" (or
    Option, Solution, Ending) it enumerates; [] when it lists none."""
    found = _ANSWER_FORMAT.search(instruction)
    if found:
        return [label.strip().lower() for label in found.group(1).split("/") if label.strip()]
    labels = []
    for kind, number in _OPTION.findall(instruction):
        label = f"{kind.lower()}{int(number)}"
        if label not in labels:
            labels.append(label)
    return labels if len(labels) >= 2 else []


def _choices(record: dict, where: str) -> list[str]:
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, "
                        f"got {json.dumps(choices)[:80]}")
    _refuse_repeats(choices, where, "'choices'")
    return choices


def _refuse_repeats(options: list[str], where: str, what: str) -> None:
    """DataError naming the first two options that are the same text (surrounding spaces
    aside): the model could not tell them apart, and a tie would pick the first."""
    first_seen: dict[str, int] = {}
    for index, option in enumerate(options):
        key = option.strip()
        if key in first_seen:
            raise DataError(f"{where}: {what} {first_seen[key]} and {index} (from 0) are the "
                            f"same text {key!r}; each must differ (surrounding spaces aside)")
        first_seen[key] = index


def _choice_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(f"{where}: 'answer' {answer} is out of range: the index of the right "
                        f"one of {len(choices)} choices, 0 to {len(choices) - 1}")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise DataError(f"{where}: 'answer' {answer!r} is neither the index (0 to "
                    f"{len(choices) - 1}) nor the text of one of its choices")


def _finite_number(value, where: str) -> float | None:
    """_number(value); DataError for a JSON number that is not finite (NaN, Infinity, an
    overflowing 1e999)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: 'answer' is {value}, not a finite number")
    return _number(value)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
            return float(text)
    return None


def load_evaluation_items(path: str | os.PathLike, warn: Callable[[str], None] | None = None
                          ) -> list[MultipleChoiceItem | ArithmeticItem]:
    """Every record of `path` as an evaluation item, in file order. warn(line) receives a
    line for each kind of pre-templated "question" record the file holds (default: a
    UserWarning)."""
    records = read_records(path)
    items = [evaluation_item(record, f"{path}: record {number}")
             for number, record in enumerate(records, 1)]

    def is_question(record: dict) -> bool:  # evaluation_item's order of formats
        return "instruction" not in record and "question" in record

    def answers(record: dict) -> list:
        return record["choices"] if "choices" in record else []

    for line in _template_warnings(path, records, is_question, answers):
        (warn or _warn)(line)
    return items


def extract_number(text: str) -> float | None:
    """The last number in a generated response, commas removed ("1,234" is 1234), as the
    published arithmetic evaluation reads it; None when there is none, or when it is too
    long to be a finite float (four hundred digits)."""
    found = _NUMBER.findall(text.replace(",", ""))
    number = float(found[-1]) if found else None
    return number if number is not None and math.isfinite(number) else None


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Move spaces that end the context to the start of the continuation, so that a BPE
    tokenizer sees " word" as it does in running text."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


__all__ = ["ALPACA_TEMPLATE", "ALPACA_TEMPLATE_NO_INPUT", "ArithmeticItem", "DataError",
           "Example", "MultipleChoiceItem", "PadCollator", "QUESTION_TEMPLATE",
           "SupervisedDataset", "TokenizedExamples", "alpaca_prompt", "check_data_file",
           "commonsense_labels", "evaluation_item", "extract_number", "load_evaluation_items",
           "load_training_examples", "longest_token_chars", "question_answer", "question_prompt",
           "read_records", "split_context", "tokenize_examples", "tokenize_head",
           "tokenize_tail", "training_example"]
