"""`moa evaluate`: multiple choice by log-likelihood (checked against a direct computation),
arithmetic by greedy generation and number extraction, the published commonsense format,
accuracy after `moa train` beating the base on learnable tasks, the table and the JSON, and
bad input as one-line errors."""

import json
import random
from pathlib import Path

import pytest
import torch

from moa import MoAConfig, get_moa_model
from moa.cli import main
from moa.data import (
    ArithmeticItem,
    DataError,
    MultipleChoiceItem,
    alpaca_prompt,
    commonsense_labels,
    evaluation_item,
    extract_number,
)
from moa.evaluate import cut_response, evaluate_items, score_multiple_choice
from moa.loading import build_text_model, byte_tokenizer
from tests.moa.tiny import perturb


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_records(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


# ---- records -------------------------------------------------------------------------------

def test_published_commonsense_records_are_multiple_choice_over_their_labels():
    arc = {"instruction": "Please choose the correct answer to the question: Which is a metal?"
                          "\n\nAnswer1: wood Answer2: iron Answer3: glass\n\nAnswer format: "
                          "answer1/answer2/answer3",
           "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    item = evaluation_item(arc, "r")
    assert isinstance(item, MultipleChoiceItem)
    assert item.continuations == ["answer1", "answer2", "answer3"] and item.answer == 1
    assert item.context == alpaca_prompt(arc["instruction"]) + "the correct answer is "
    boolq = {"instruction": "Please answer the following question with true or false, "
                            "question: is water wet?\n\nAnswer format: true/false",
             "answer": "false"}
    item = evaluation_item(boolq, "r")
    assert item.continuations == ["true", "false"] and item.answer == 1
    assert item.context.endswith("### Response:\nthe correct answer is ")  # default prefix
    # no "Answer format" line: the enumerated SolutionK labels
    assert commonsense_labels("Goal: x\n\nSolution1: a\n\nSolution2: b") == \
        ["solution1", "solution2"]
    math = {"instruction": "Tom has 3 apples and buys 4. How many?", "input": "",
            "output": "3 + 4 = 7", "answer": "7"}
    item = evaluation_item(math, "r")
    assert isinstance(item, ArithmeticItem) and item.answer == 7.0
    assert item.prompt == alpaca_prompt(math["instruction"])


def test_question_records_and_their_prompts():
    item = evaluation_item({"question": "2 + 2?", "choices": ["3", "4"], "answer": "4"}, "r")
    assert item.context == "Question: 2 + 2?\nAnswer:" and item.continuations == [" 3", " 4"]
    assert item.answer == 1  # the answer given as the choice's text
    item = evaluation_item({"question": "2 + 2?", "answer": "1,024"}, "r")
    assert item.prompt == "Question: 2 + 2?\nAnswer:" and item.answer == 1024.0
    item = evaluation_item({"prompt": "2+2=", "choices": ["3", "4"], "answer": 0}, "r")
    assert item.context == "2+2=" and item.continuations == ["3", "4"]  # verbatim


@pytest.mark.parametrize("text,number", [
    ("The answer is 42.", 42.0),  # trailing full stop is not a decimal
    ("3 apples and 4 more make 7", 7.0),  # the last number counts
    ("-12", -12.0),  # negative
    ("about 1,234.5 metres", 1234.5),  # thousands separator and decimals
    ("no number here", None),
])
def test_number_extraction(text, number):
    assert extract_number(text) == number


def test_responses_stop_where_a_new_prompt_begins():
    assert cut_response(" 7\nQuestion: 8 + 1?\nAnswer: 9") == " 7"
    assert cut_response("so 12\n\n### Instruction:\nmore") == "so 12\n\n"
    assert cut_response(" plain") == " plain"


# ---- scoring -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", [
    None,  # the base model
    "soft_moa",  # routers, parallel adapters and the position-dependent prompt expert
])
def test_batched_scores_are_the_log_likelihoods_of_each_choice(preset):
    tokenizer, model = byte_tokenizer(), build_text_model()
    if preset is not None:
        model = get_moa_model(model, MoAConfig.preset(preset)).eval()
        perturb(model)
    items = [MultipleChoiceItem("Question: a?\nAnswer:", [" yes", " no", " maybe so"], 0),
             MultipleChoiceItem("Q: much longer context here\nA: ", ["x", "yy"], 1),
             MultipleChoiceItem("Pick:", ["a", "b", "c", "d"], 2)]  # one token each
    scores = score_multiple_choice(model, tokenizer, items, batch_size=3, max_length=512,
                                   device=torch.device("cpu"), progress=False)
    # one item per batch: no padding, and the last batch has one-token choices only
    alone = score_multiple_choice(model, tokenizer, items, batch_size=1, max_length=512,
                                  device=torch.device("cpu"), progress=False)
    for batched, single in zip(scores, alone):
        assert batched == pytest.approx(single, abs=1e-4)
    for item, item_scores in zip(items, scores):
        for continuation, score in zip(item.continuations, item_scores):
            context = item.context.rstrip(" ")  # the space moves to the continuation
            moved = item.context[len(context):] + continuation
            prompt = tokenizer(context)["input_ids"]
            target = tokenizer(moved, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(target))
            assert score == pytest.approx(expected, abs=1e-4)


def test_accuracy_and_length_normalised_accuracy_follow_the_scores(monkeypatch):
    import moa.evaluate

    items = [MultipleChoiceItem("c", [" a", " bbbbbbbbb"], 1),
             MultipleChoiceItem("c", [" a", " bb"], 0)]
    # first item: choice 0 is likelier in sum (wrong), choice 1 per character (right)
    monkeypatch.setattr(moa.evaluate, "score_multiple_choice",
                        lambda *args, **kwargs: [[-2.0, -5.0], [-1.0, -3.0]])
    result = evaluate_items(None, None, items, progress=False)
    assert result["tasks"]["multiple_choice"] == {"records": 2, "accuracy": 0.5,
                                                  "accuracy_norm": 1.0}
    assert [p["prediction"] for p in result["predictions"]] == [0, 0]
    assert [p["prediction_norm"] for p in result["predictions"]] == [1, 0]
    assert result["accuracy"] == 0.5


# ---- end to end: training lifts accuracy ------------------------------------------------------

FRUITS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew"]
NAMES = ["Ann", "Bob", "Cid", "Dee"]


def fruit_records(rng: random.Random, copies: int) -> list[dict]:
    """Whose favourite fruit: a fixed, arbitrary pairing (random for the base model), each
    question with two distractors drawn afresh and shuffled."""
    favourite = dict(zip(NAMES, random.Random(7).sample(FRUITS, len(NAMES))))
    records = []
    for _ in range(copies):
        for name, fruit in favourite.items():
            choices = rng.sample([f for f in FRUITS if f != fruit], 2) + [fruit]
            rng.shuffle(choices)
            records.append({"question": f"Which fruit does {name} like?", "choices": choices,
                            "answer": choices.index(fruit)})
    return records


def test_training_lifts_multiple_choice_accuracy_above_the_base(tmp_path, capsys):
    train = write_records(tmp_path / "train.jsonl", fruit_records(random.Random(1), 3))
    test = write_records(tmp_path / "test.jsonl", fruit_records(random.Random(2), 2))
    out = run(["evaluate", "--data", test, "--out", str(tmp_path / "base.json")], capsys)
    assert out.splitlines()[-3].split()[:3] == ["task", "records", "accuracy"]
    run(["train", "--data", train, "--steps", "120", "--lr", "3e-2", "--batch-size", "8",
         "--out", str(tmp_path / "run")], capsys)
    run(["evaluate", "--data", test, "--adapter", str(tmp_path / "run" / "adapter"),
         "--out", str(tmp_path / "after.json")], capsys)
    base = json.loads((tmp_path / "base.json").read_text())
    after = json.loads((tmp_path / "after.json").read_text())
    assert base["records"] == after["records"] == 8
    assert after["accuracy"] >= 0.75 and after["accuracy"] > base["accuracy"] + 0.25, \
        (base["accuracy"], after["accuracy"])
    assert after["tasks"]["multiple_choice"]["accuracy"] == after["accuracy"]
    assert len(after["predictions"]) == 8 and after["adapter"].endswith("adapter")


def test_training_on_the_published_format_lifts_its_accuracy(tmp_path, capsys):
    # The right option is always the first (the base model's least likely label): what
    # training on the published form teaches ("the correct answer is answer1") must move
    # the label scores that the commonsense evaluation reads. (Associating questions with
    # answers is the question-format test's part.)
    rng = random.Random(3)

    def records(count: int) -> list[dict]:
        result = []
        for _ in range(count):
            options = rng.sample(FRUITS, 3)
            listed = " ".join(f"Answer{i + 1}: {f}" for i, f in enumerate(options))
            result.append({"instruction": f"Please choose the correct answer to the "
                                          f"question: which does {rng.choice(NAMES)} pick?"
                                          f"\n\n{listed}\n\nAnswer format: "
                                          "answer1/answer2/answer3",
                           "input": "", "output": "the correct answer is answer1",
                           "answer": "answer1"})
        return result

    train = write_records(tmp_path / "train.jsonl", records(12))
    test = write_records(tmp_path / "test.jsonl", records(6))
    run(["evaluate", "--data", test, "--out", str(tmp_path / "base.json")], capsys)
    run(["train", "--data", train, "--steps", "30", "--lr", "3e-2", "--batch-size", "6",
         "--out", str(tmp_path / "run")], capsys)
    run(["evaluate", "--data", test, "--adapter", str(tmp_path / "run"),  # OUT finds adapter/
         "--out", str(tmp_path / "after.json")], capsys)
    base = json.loads((tmp_path / "base.json").read_text())
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["accuracy"] == 1.0 and base["accuracy"] < 0.5, (base, after)
    assert after["predictions"][0]["log_likelihoods"][0] > \
        base["predictions"][0]["log_likelihoods"][0]


def test_arithmetic_by_greedy_generation_after_training(tmp_path, capsys):
    sums = [(2, 3), (4, 4), (7, 1), (6, 5), (9, 9), (3, 8)]
    records = [{"question": f"{a} + {b} = ?", "answer": a + b} for a, b in sums]
    data = write_records(tmp_path / "sums.jsonl", records)
    run(["evaluate", "--data", data, "--max-new-tokens", "6",
         "--out", str(tmp_path / "base.json")], capsys)
    run(["train", "--data", data, "--steps", "80", "--lr", "3e-2", "--batch-size", "6",
         "--out", str(tmp_path / "run")], capsys)
    out = run(["evaluate", "--data", data, "--adapter", str(tmp_path / "run" / "adapter"),
               "--max-new-tokens", "6", "--batch-size", "4",
               "--out", str(tmp_path / "after.json")], capsys)
    assert "arithmetic" in out
    base = json.loads((tmp_path / "base.json").read_text())
    after = json.loads((tmp_path / "after.json").read_text())
    assert base["tasks"]["arithmetic"]["accuracy"] <= 1 / 6
    assert after["accuracy"] >= 5 / 6, after["predictions"]
    right = [p for p in after["predictions"] if p["correct"]]
    assert all(p["prediction"] == p["answer"] for p in right)


def test_a_mixed_file_reports_each_task_and_all(tmp_path, capsys):
    data = write_records(tmp_path / "mixed.jsonl", [
        {"question": "a?", "choices": ["x", "y"], "answer": 0},
        {"question": "1 + 1 = ?", "answer": 2}])
    out = run(["evaluate", "--data", data, "--max-new-tokens", "2",
               "--out", str(tmp_path / "r.json")], capsys)
    assert [line.split()[0] for line in out.splitlines()[-5:-1]] == \
        ["task", "multiple", "arithmetic", "all"]
    result = json.loads((tmp_path / "r.json").read_text())
    correct = sum(p["correct"] for p in result["predictions"])
    assert result["accuracy"] == correct / 2 and result["records"] == 2


# ---- bad input -----------------------------------------------------------------------------

def one_line_error(capsys, argv: list[str]) -> str:
    """The error line of a failing command (a loading progress bar may come before it)."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    lines = [line for line in err.splitlines() if "moa: error" in line]
    assert len(lines) == 1 and lines[0].startswith("moa: error: ") and \
        err.endswith(lines[0] + "\n"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("records,message", [
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q"}],
     "record 2 has no 'answer' field; allowed records: 'question' (or 'prompt'), 'choices'"),
    ([{"question": "q", "answer": "blue"}],  # not a number, no choices
     "record 1: 'answer' 'blue' is not a number and the record has no 'choices'"),
    ([{"question": "q", "choices": ["a"], "answer": 0}],  # one choice
     "record 1: 'choices' must be a list of at least 2 non-empty strings"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 5}],
     "record 1: 'answer' 5 is out of range"),
    ([{"instruction": "Pick.\n\nAnswer1: a Answer2: b", "answer": "answer3"}],
     "record 1: 'answer' is 'answer3', but the instruction's options are answer1, answer2"),
    ([{"instruction": "Say hi.", "answer": "hi"}],  # published, neither labels nor a number
     "record 1: 'answer' 'hi' is neither a number nor one of options listed"),
    ([{"text": "x"}], "record 1 has none of the fields 'question', 'prompt', 'instruction'"),
])
def test_bad_records_are_one_line_errors(records, message, tmp_path, capsys):
    data = write_records(tmp_path / "data.jsonl", records)
    err = one_line_error(capsys, ["evaluate", "--data", data, "--out", str(tmp_path / "r.json")])
    assert message in err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(DataError):
        evaluation_item(records[-1], "r")


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert "no such data file" in one_line_error(
        capsys, ["evaluate", "--data", str(tmp_path / "none.jsonl"), "--out", out])
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "is empty: no usable record" in one_line_error(
        capsys, ["evaluate", "--data", str(tmp_path / "empty.jsonl"), "--out", out])
    data = write_records(tmp_path / "data.jsonl",
                         [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    assert "no such adapter directory" in one_line_error(
        capsys, ["evaluate", "--data", data, "--adapter", str(tmp_path / "nope"), "--out", out])
    assert "no MoA adapter in" in one_line_error(
        capsys, ["evaluate", "--data", data, "--adapter", str(tmp_path), "--out", out])
    assert "no such model" in one_line_error(
        capsys, ["evaluate", "--data", data, "--model", str(tmp_path / "m"), "--out", out])
    assert "is a directory; name a JSON file" in one_line_error(
        capsys, ["evaluate", "--data", data, "--out", str(tmp_path)])


def test_an_adapter_for_another_base_is_one_line(tmp_path, capsys):
    other = tmp_path / "other"  # a checkpoint of another shape, with the same tokenizer
    build_text_model(hidden_size=32).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    moa = get_moa_model(build_text_model(), MoAConfig.preset("soft_moa"))
    moa.save_pretrained(tmp_path / "adapter")
    data = write_records(tmp_path / "data.jsonl",
                         [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    err = one_line_error(capsys, ["evaluate", "--model", str(other), "--adapter",
                                  str(tmp_path / "adapter"), "--data", data,
                                  "--out", str(tmp_path / "r.json")])
    assert f"the adapter in {str(tmp_path / 'adapter')!r} (trained on " \
           "'moa-embedded-text-llama') does not fit" in err
    assert "shape mismatches" in err
