"""moa/cli/data.py: what a data path must be, what records are refused, and tokenising a cut
text exactly as the whole text would be tokenised and then cut."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moa.cli.data import (
    CUT_MARGIN_TOKENS,
    DataError,
    Example,
    check_data_file,
    load_evaluation_items,
    load_training_examples,
    longest_token_chars,
    read_records,
    tokenize_examples,
    tokenize_head,
    tokenize_tail,
    training_example,
)
from moa.cli.loading import byte_tokenizer


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@contextlib.contextmanager
def fifo_unblocked_after(path: Path, seconds: float):
    """A FIFO at `path`; after `seconds` a writer opens and closes it, so a reader that
    blocked on it gets end-of-file (and a test that would hang fails instead)."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(0.05):
            if time.monotonic() < deadline:
                continue
            try:  # a non-blocking open for writing fails (ENXIO) while no reader waits
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


# ---- data paths ------------------------------------------------------------------------------

def test_a_regular_file_is_accepted_and_a_missing_one_is_not_found(tmp_path):
    data = write_records(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    assert check_data_file(data) == data
    with pytest.raises(FileNotFoundError, match="no such data file: '.*none.jsonl'"):
        check_data_file(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match="no such data file"):  # under a file
        check_data_file(data / "inner.jsonl")


@pytest.mark.parametrize("make, says", [
    pytest.param(lambda tmp: tmp, "is a directory, not a JSON or JSONL data file",
                 id="a-directory"),
    pytest.param(lambda tmp: Path(os.devnull), "is not a regular file (it is a character "
                 "device)", id="dev-null"),
])
def test_a_path_that_is_not_a_regular_file_says_what_it_is(make, says, tmp_path):
    with pytest.raises(DataError, match=f"{make(tmp_path)}.*{_escape(says)}"):
        check_data_file(make(tmp_path))
    with pytest.raises(DataError, match=_escape(says)):
        read_records(make(tmp_path))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    with fifo_unblocked_after(tmp_path / "pipe.jsonl", seconds=20) as fifo:
        started = time.monotonic()
        with pytest.raises(DataError, match=_escape("is not a regular file (it is a FIFO")):
            read_records(fifo)
        assert time.monotonic() - started < 10


def _escape(text: str) -> str:
    return re.escape(text)


# ---- records that are refused ----------------------------------------------------------------

@pytest.mark.parametrize("record, says", [
    pytest.param({"question": "q", "choices": ["a", "a"], "answer": 0},
                 "'choices' 0 and 1 (from 0) are the same text 'a'", id="question-format"),
    pytest.param({"question": "q", "choices": ["x", "a", " a "], "answer": 0},
                 "'choices' 1 and 2 (from 0) are the same text 'a'",
                 id="same-after-stripping-spaces"),
    pytest.param({"prompt": "2+2=", "choices": ["4", "5", "4"], "answer": 0},
                 "'choices' 0 and 2 (from 0) are the same text '4'", id="prompt-format"),
    pytest.param({"instruction": "Pick one.\n\nAnswer format: answer1/answer2/answer1",
                  "answer": "answer2"},
                 "the instruction's answer labels 0 and 2 (from 0) are the same text "
                 "'answer1'", id="published-format-labels"),
])
def test_repeated_choices_are_refused_naming_the_record(record, says, tmp_path):
    data = write_records(tmp_path / "d.jsonl", [{"question": "ok", "choices": ["a", "b"],
                                                 "answer": 0}, record])
    with pytest.raises(DataError, match=f"d.jsonl: record 2: {re.escape(says)}"):
        load_evaluation_items(data)
    if "question" in record:  # training reads the choices of this format too
        with pytest.raises(DataError, match=f"record 2: {re.escape(says)}"):
            training_example({**record, "answer": 1}, "d.jsonl: record 2")


@pytest.mark.parametrize("answer_text", [
    pytest.param("NaN", id="nan-literal"),
    pytest.param("Infinity", id="infinity-literal"),
    pytest.param("-Infinity", id="minus-infinity-literal"),
    pytest.param("1e999", id="a-number-that-overflows-to-inf"),
])
def test_a_non_finite_answer_is_refused_naming_the_record(answer_text, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1 + 1 = ?", "answer": 2}\n'
                    f'{{"question": "2 + 2 = ?", "answer": {answer_text}}}\n')
    with pytest.raises(DataError, match="d.jsonl: record 2: 'answer' is .*, not a finite "
                                        "number"):
        load_training_examples(data)  # would train on the text " nan" / " inf"
    with pytest.raises(DataError, match="d.jsonl: record 2: 'answer' is .*, not a finite "
                                        "number"):
        load_evaluation_items(data)


# ---- records prepared for another harness ---------------------------------------------------

def test_pre_templated_questions_warn_once_per_file_with_counts(tmp_path):
    data = write_records(tmp_path / "d.jsonl", [
        {"question": "Question: Which is a metal?\nAnswer:", "choices": [" iron", " wood"],
         "answer": 0},  # the whole template, and choices with their space
        {"question": "Which is a gas?\nAnswer:", "choices": ["air", "rock"], "answer": 0},
        {"question": "Which is wet?", "choices": ["water", "sand"], "answer": 0},  # plain
        {"prompt": "Question: as given\nAnswer:", "choices": [" a", " b"], "answer": 0}])
    lines = []
    items = load_evaluation_items(data, warn=lines.append)
    assert len(lines) == 2, lines
    assert "d.jsonl: 2 of 3 'question' records already hold the question template" in lines[0]
    assert "d.jsonl: 1 of 3 'question' records have answers or choices that start with a " \
           "space" in lines[1]
    assert items[0].continuations == [" iron", " wood"]  # no second space
    assert items[2].continuations == [" water", " sand"]
    assert items[3].continuations == [" a", " b"]  # prompt records: as given
    with pytest.warns(UserWarning) as caught:  # without warn=: Python warnings
        load_evaluation_items(data)
    assert [str(warning.message) for warning in caught] == lines
    training = []
    records = [json.loads(line) for line in data.read_text().splitlines()][:3]
    examples = load_training_examples(write_records(tmp_path / "t.jsonl", records + [
        {"question": "Name a gas.", "answer": " air"}]), warn=training.append)
    assert [e.completion for e in examples] == [" iron", " air", " water", " air"]
    assert len(training) == 2 and "2 of 4" in training[0] and "2 of 4" in training[1]
    plain = write_records(tmp_path / "plain.jsonl", [
        {"question": "Which is wet?", "choices": ["water", "sand"], "answer": 0}])
    quiet = []
    load_evaluation_items(plain, warn=quiet.append)
    load_training_examples(plain, warn=quiet.append)
    assert quiet == []


# ---- tokenising a cut text --------------------------------------------------------------------

CORPUS = ["the quick brown fox jumps over the lazy dog", "Question: which is a metal?\nAnswer: "
          "iron", "newton is the SI unit of force", "photosynthesis happens in chloroplasts",
          "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 1,234.5"] * 20


def trained_tokenizer(kind: str):
    """A small tokenizer of `kind`, trained on CORPUS (real merges, offline, milliseconds):
    - "bpe": byte-level BPE with GPT-2's pre-tokenizer regex and a start token (<s>), as
      Llama 3, SmolLM2 and Qwen tokenize;
    - "wordpiece": BERT's normaliser and pre-tokenizer, which drop whitespace, so a token
      can stand for more characters than it spells; [CLS] ... [SEP] around the text;
    - "unigram": SentencePiece-style Metaspace pieces chosen by a Viterbi search."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                       eos_token="</s>")
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t))
                                                     for t in ("[CLS]", "[SEP]")])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "</s>"], unk_token="<unk>",
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   eos_token="</s>")


TOKENIZERS = {"byte": byte_tokenizer(), **{kind: trained_tokenizer(kind)
                                           for kind in ("bpe", "wordpiece", "unigram")}}
WORDS = sorted({word for line in CORPUS for word in line.split()}) + [
    "<s>", "</s>", "[SEP]", "<|endoftext|>", "\u00e9", "a" * 70, "\t", "  ", "\n"]


@st.composite
def texts(draw) -> str:
    """Up to some ten thousand characters: corpus words (special-token spellings and a
    70-letter word among them) and arbitrary short strings, joined by assorted separators,
    a block of them repeated and a different end, so that cuts fall inside words, inside
    runs of spaces and beside special tokens."""
    def joined() -> str:
        pieces = draw(st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=60))
        separators = draw(st.lists(st.sampled_from(["", " ", "  ", "\n", ", ", "      "]),
                                   min_size=len(pieces), max_size=len(pieces)))
        return "".join(p + s for p, s in zip(pieces, separators))

    return joined() * draw(st.integers(1, 40)) + joined()


@pytest.mark.parametrize("longest", [
    None,  # the tokenizer's own: the piece a real call tokenises first
    1,  # pieces of count + CUT_MARGIN_TOKENS characters: more cuts, closer to the tokens kept
])
@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts(), count=st.integers(0, 60), special=st.booleans())
# words over WordPiece's 100-character limit, which the cut shortens below it (one unknown
# token whole, the word's pieces cut): examples this test once drew at random
@example(text="1,234.51,234.51,234.5SI" + "a" * 70 + "1,234.5", count=13, special=False)
@example(text="1,234.51,234.50" + "a" * 70, count=1, special=False)
def test_a_cut_text_gives_the_tokens_of_the_whole_text(name, longest, text, count, special):
    tokenizer = TOKENIZERS[name]
    whole = tokenizer(text, add_special_tokens=special)["input_ids"]
    assert tokenize_head(tokenizer, text, count, special, longest) == whole[:count]
    last = whole[max(0, len(whole) - count):] if count else []
    assert tokenize_tail(tokenizer, text, count, special, longest) == last


def reference_features(tokenizer, example: Example, max_length: int) -> dict | None:
    """tokenize_examples' rule on the whole texts' tokens: the prompt's leading special
    tokens, its end, then the response (completion and end-of-text) cut to fit; None where
    no response token would be predicted."""
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    prompt = tokenizer(example.prompt)["input_ids"]
    special = 0
    while special < len(prompt) and prompt[special] in tokenizer.all_special_ids:
        special += 1
    room = max_length - special
    response = (completion + [tokenizer.eos_token_id])[:max(room, 0)]
    keep = room - len(response)
    ids = prompt[:special] + (prompt[special:][-keep:] if keep > 0 else []) + response
    labels = [-100] * (len(ids) - len(response)) + response
    return {"input_ids": ids, "labels": labels} if any(x != -100 for x in labels[1:]) else None


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=texts(), completion=texts(), max_length=st.integers(1, 40))
def test_training_features_are_those_of_the_whole_texts(name, prompt, completion, max_length):
    tokenizer = TOKENIZERS[name]
    example = Example(prompt, completion)
    tokenized = tokenize_examples(tokenizer, [example], max_length)
    if not completion.strip() or not tokenizer(completion, add_special_tokens=False)[
            "input_ids"]:
        assert tokenized.empty_response == 1 and not tokenized.features
        return
    expected = reference_features(tokenizer, example, max_length)
    assert tokenized.features == ([expected] if expected else [])
    assert tokenized.no_room == (expected is None)
    for feature in tokenized.features:
        assert len(feature["input_ids"]) <= max_length
        assert any(label != -100 for label in feature["labels"][1:])  # something to learn


class CountingTokenizer:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text: str, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_a_huge_record_is_tokenised_in_pieces_that_max_length_bounds(name):
    # 4 MB each way: before the cut came first, the whole text was tokenised (the issue's
    # 50 MB record: 80-90 s and 9.7 GB)
    tokenizer = CountingTokenizer(TOKENIZERS[name])
    prompt = "Question: " + "the quick brown fox " * 200_000 + "which is a metal?\nAnswer:"
    completion = " iron " + "and more words " * 280_000
    max_length = 48
    features = tokenize_examples(tokenizer, [Example(prompt, completion)], max_length)
    bound = 2 * (max_length + 1 + CUT_MARGIN_TOKENS) * longest_token_chars(tokenizer)
    assert max(tokenizer.lengths) <= bound, (max(tokenizer.lengths), bound)
    # the same tokens as the whole texts', checked on a copy a hundredth as long
    short = Example(prompt[:20_000] + prompt[-20_000:], completion[:40_000])
    assert tokenize_examples(TOKENIZERS[name], [short], max_length).features == \
        [reference_features(TOKENIZERS[name], short, max_length)]
    assert features.features[0]["labels"][-max_length // 2:] == \
        tokenize_examples(TOKENIZERS[name], [short], max_length).features[0]["labels"][
            -max_length // 2:]


def test_max_length_that_leaves_no_predicted_token_leaves_the_example_out():
    tokenizer = byte_tokenizer()  # no start token: the response would begin the sequence
    examples = [Example("Q: sky?\nA:", " blue"), Example("", "red")]
    one = tokenize_examples(tokenizer, examples, max_length=1)
    assert one.features == [] and one.no_room == 2  # [" "] alone: nothing is predicted
    two = tokenize_examples(tokenizer, examples, max_length=2)
    # the response comes first (then the prompt's end): one token predicted from another
    assert [f["labels"] for f in two.features] == [tokenizer(" b")["input_ids"],
                                                   tokenizer("re")["input_ids"]]
    assert two.no_room == 0
