"""`moa evaluate`: multiple choice by log-likelihood (checked against a direct computation),
arithmetic by greedy generation and number extraction, the published commonsense format,
accuracy after `moa train` beating the base on learnable tasks, the table and the JSON, and
bad input as one-line errors."""

import json
import math
import os
import random
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from moa import MoAConfig, get_moa_model
from moa.cli import main
from moa.cli.data import (
    CUT_MARGIN_TOKENS,
    ArithmeticItem,
    DataError,
    MultipleChoiceItem,
    alpaca_prompt,
    commonsense_labels,
    evaluation_item,
    extract_number,
    longest_token_chars,
)
from moa.cli.evaluate import (
    cut_response,
    evaluate_items,
    generate_responses,
    score_multiple_choice,
)
from moa.cli.loading import build_text_model, byte_tokenizer
from tests.moa.cli.conftest import one_line_error
from tests.moa.cli.test_data import CountingTokenizer, trained_tokenizer
from tests.moa.tiny import perturb

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


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
    ("1" * 400, None),  # too long for a finite float: no number, never inf in the JSON
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
    "sparse_moa",  # threshold routing: which experts run depends on each token
    "adamole",  # adaptive thresholds, and the balancing loss's hook on the routers
    "topk_moelora",  # top-2 selection per token
    "hydralora",  # one shared A per module and a router over the B heads
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


def test_scoring_builds_no_autograd_graph():
    """Scoring a model with trainable adapters (as `moa compare` does right after training)
    runs every forward without autograd: with it, each batch kept every layer's activations
    for a backward that never comes (the 64 longest ARC-Challenge questions at batch 16 on
    SmolLM2-135M: 12.85 GB resident with it, 2.54 GB without)."""
    model = get_moa_model(build_text_model(), MoAConfig.preset("soft_moa")).train(False)
    assert any(p.requires_grad for p in model.parameters())
    grad_modes = []
    model.register_forward_hook(lambda module, args, output: grad_modes.append(
        (torch.is_grad_enabled(), output.logits.requires_grad)))
    items = [MultipleChoiceItem("Question: a?\nAnswer:", [" yes", " no, not at all"], 0)]
    score_multiple_choice(model, byte_tokenizer(), items, batch_size=1, max_length=512,
                          device=CPU, progress=False)
    assert len(grad_modes) == 2  # the context pass and the continuations' pass
    assert grad_modes == [(False, False)] * 2


@pytest.mark.parametrize("adapter", [
    None,  # the base model alone
    "soft_moa",  # a saved MoA adapter over it
])
def test_a_model_loaded_for_inference_requires_no_grad(adapter, tmp_path):
    from moa.cli.evaluate import load_adapted_model

    path = None
    if adapter is not None:
        path = tmp_path / "adapter"
        get_moa_model(build_text_model(), MoAConfig.preset(adapter)).save_pretrained(path)
    model = load_adapted_model(None, None if path is None else str(path), log=lambda _: None)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not [name for name, p in model.named_parameters() if p.requires_grad]


def test_accuracy_and_length_normalised_accuracy_follow_the_scores(monkeypatch):
    import moa.cli.evaluate

    items = [MultipleChoiceItem("c", [" a", " bbbbbbbbb"], 1),
             MultipleChoiceItem("c", [" a", " bb"], 0)]
    # first item: choice 0 is likelier in sum (wrong), choice 1 per character (right)
    monkeypatch.setattr(moa.cli.evaluate, "score_multiple_choice",
                        lambda *args, **kwargs: [[-2.0, -5.0], [-1.0, -3.0]])
    result = evaluate_items(None, None, items, progress=False)
    assert result["tasks"]["multiple_choice"] == {"records": 2, "accuracy": 0.5,
                                                  "accuracy_norm": 1.0, "non_finite": 0}
    assert [p["prediction"] for p in result["predictions"]] == [0, 0]
    assert [p["prediction_norm"] for p in result["predictions"]] == [1, 0]
    assert result["accuracy"] == 0.5 and result["non_finite"] == 0


@pytest.mark.parametrize("bad", [
    pytest.param(float("nan"), id="nan"),  # an adapter whose weights are NaN
    pytest.param(float("inf"), id="plus-infinity"),
    pytest.param(float("-inf"), id="minus-infinity"),  # a logit of -inf on a choice's token
])
def test_a_record_with_a_score_that_is_not_finite_is_wrong_and_counted(bad, monkeypatch):
    import moa.cli.evaluate

    # the right answer is choice 0 everywhere: where a NaN fell back to the first choice,
    # the NaN records would count as right
    items = [MultipleChoiceItem("c", [" a", " b"], 0) for _ in range(4)]
    monkeypatch.setattr(moa.cli.evaluate, "score_multiple_choice", lambda *args, **kwargs: [
        [bad, bad], [bad, -1.0], [-1.0, bad], [-1.0, -2.0]])
    result = evaluate_items(None, None, items, progress=False)
    task = result["tasks"]["multiple_choice"]
    assert task == {"records": 4, "accuracy": 0.25, "accuracy_norm": 0.25, "non_finite": 3}
    assert result["accuracy"] == 0.25 and result["non_finite"] == 3
    for prediction in result["predictions"][:3]:
        assert prediction["correct"] is False and prediction["non_finite"] is True
        assert prediction["prediction"] is None and prediction["prediction_norm"] is None
    assert result["predictions"][1]["log_likelihoods"] == [None, -1.0]  # JSON null
    assert result["predictions"][3]["correct"] is True


def direct_score(model, context: list[int], choice: list[int]) -> float:
    """The choice's log-likelihood after the context, from one forward of both."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + choice])).logits[0].log_softmax(-1)
    return sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(choice))


def test_long_texts_are_scored_on_the_tokens_the_whole_texts_keep():
    # 4 MB of context and 1 MB of choice: only pieces that max_length bounds are tokenised
    tokenizer, model = byte_tokenizer(), build_text_model()
    context = "Question: " + "the quick brown fox " * 200_000 + "which is a metal?\nAnswer:"
    choices = [" iron", " wood" + " and more" * 100_000]
    counting = CountingTokenizer(tokenizer)
    max_length = 24
    scores = score_multiple_choice(model, counting, [MultipleChoiceItem(context, choices, 0)],
                                   1, max_length, CPU, progress=False)[0]
    bound = 2 * (max_length + 1 + CUT_MARGIN_TOKENS) * longest_token_chars(tokenizer)
    assert max(counting.lengths) <= bound, (max(counting.lengths), bound)
    # byte tokens: the whole texts' tokens, cut, are those of the texts' ends and starts
    cut = [tokenizer(c[:100], add_special_tokens=False)["input_ids"][:max_length // 2]
           for c in choices]
    kept = tokenizer(context[-100:])["input_ids"][-(max_length - max(map(len, cut))):]
    assert scores == pytest.approx([direct_score(model, kept, c) for c in cut], abs=1e-4)
    # generation keeps the prompt's last max_length - max_new_tokens tokens
    counting.lengths.clear()
    responses, _ = generate_responses(model, counting, [context], 1, 4, max_length, CPU,
                                      progress=False)
    assert max(counting.lengths) <= bound
    assert responses == generate_responses(model, tokenizer, [context[-100:]], 1, 4,
                                           max_length, CPU, progress=False)[0]


@pytest.mark.parametrize("choices, max_length, says", [
    pytest.param([" x", " y"], 1, "choices 0 and 1 (from 0) begin with the same 1 tokens, all "
                 "that --max-length 1 keeps of a choice (half of it), so their scores would "
                 "tie; give --max-length 4 or more", id="max-length-1-leaves-the-space"),
    pytest.param([" apple", " apricot", " pear"], 5, "choices 0 and 1 (from 0) begin with "
                 "the same 2 tokens, all that --max-length 5 keeps of a choice (half of it), "
                 "so their scores would tie; give --max-length 8 or more",
                 id="cut-inside-a-shared-start"),
    pytest.param([" to", " top"], 6, "choices 0 and 1 (from 0) begin with the same 3 "
                 "tokens, all that --max-length 6 keeps of a choice (half of it), so their "
                 "scores would tie; give --max-length 8 or more",
                 id="one-choice-is-the-start-of-the-other"),
])
def test_choices_that_the_cut_makes_equal_are_refused(choices, max_length, says):
    item = MultipleChoiceItem("Question: q?\nAnswer:", choices, 0, where="d.jsonl: record 2")
    with pytest.raises(ValueError, match=f"^d.jsonl: record 2: {re.escape(says)}$"):
        score_multiple_choice(None, byte_tokenizer(), [item], 1, max_length, CPU,
                              progress=False)  # refused before the model runs
    needed = int(says.split("--max-length ")[-1].split()[0])
    scores = score_multiple_choice(build_text_model(), byte_tokenizer(), [item], 1, needed,
                                   CPU, progress=False)[0]
    assert len(set(scores)) == len(scores)  # told apart: no tie


def test_choices_that_tokenize_the_same_are_refused():
    tokenizer = trained_tokenizer("wordpiece")  # uncased: "Iron" and "iron" are one text
    item = MultipleChoiceItem("Question: which?\nAnswer:", [" Iron", " iron"], 0)
    with pytest.raises(ValueError, match="item 1: choices 0 and 1 .* are the same tokens for "
                                         "this tokenizer, so their scores would tie"):
        score_multiple_choice(None, tokenizer, [item], 1, 64, CPU, progress=False)


def test_our_calls_into_transformers_raise_no_deprecation_warning():
    # transformers 5.25 deprecates forward(past_key_values=) for cache= (removed in 5.40):
    # against it, passing the old name warns (FutureWarning), and this fails
    model = get_moa_model(build_text_model(), MoAConfig.preset("soft_moa")).eval()
    perturb(model)
    items = [MultipleChoiceItem("Question: a?\nAnswer:", [" yes", " no way"], 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        score_multiple_choice(model, byte_tokenizer(), items, 1, 64, CPU, progress=False)
        generate_responses(model, byte_tokenizer(), ["1 + 1 ="], 1, 3, 64, CPU,
                           progress=False)


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


def refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def test_an_adapter_with_nan_weights_gets_no_answer_right(tmp_path, capsys):
    # every log-likelihood is NaN: the prediction used to fall to choice 0, and the results
    # JSON held bare NaN
    moa = get_moa_model(build_text_model(), MoAConfig.preset("soft_moa"))
    with torch.no_grad():
        for _, parameter in moa.moa_named_parameters():
            parameter.fill_(float("nan"))
    moa.save_pretrained(tmp_path / "adapter")
    data = write_records(tmp_path / "d.jsonl", [
        {"question": f"{name}?", "choices": ["yes", "no"], "answer": 0}
        for name in ("a", "b", "c")] + [{"question": "1 + 1 = ?", "answer": 2}])
    out = run(["evaluate", "--data", data, "--adapter", str(tmp_path / "adapter"),
               "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")], capsys)
    assert "warning: 4 of 4 records had scores that are not finite" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(
        ("multiple", "arithmetic", "all"))] == ["3", "1", "4"]  # the non-finite column
    result = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse_constant)
    assert result["accuracy"] == 0.0 and result["non_finite"] == 4
    assert result["tasks"]["multiple_choice"]["non_finite"] == 3
    assert all(p["correct"] is False and p["non_finite"] for p in result["predictions"])
    assert result["predictions"][0]["log_likelihoods"] == [None, None]


def test_pre_templated_records_warn_in_the_output(tmp_path, capsys):
    data = write_records(tmp_path / "d.jsonl", [
        {"question": "Question: Which is a metal?\nAnswer:", "choices": ["iron", "wood"],
         "answer": 0}])
    out = run(["evaluate", "--data", data, "--out", str(tmp_path / "r.json")], capsys)
    assert "warning: " + data + ": 1 of 1 'question' records already hold the question " \
           "template" in out


# ---- --out: never an input, never another run's file, writable before anything loads ------

@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or a tokenizer fails the test: what is refused is refused first."""
    import moa.cli.evaluate
    import moa.cli.loading

    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before --out was checked")

    monkeypatch.setattr(moa.cli.evaluate, "load_adapted_model", loaded)
    monkeypatch.setattr(moa.cli.loading, "load_tokenizer", loaded)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    get_moa_model(build_text_model(), MoAConfig.preset("soft_moa")).save_pretrained(folder)
    return folder


def _data_file(tmp_path: Path) -> Path:
    return Path(write_records(tmp_path / "d.jsonl",
                              [{"question": "q", "choices": ["a", "b"], "answer": 0}]))


@pytest.mark.parametrize("make_out, names", [
    pytest.param(lambda tmp, adapter: tmp / "d.jsonl", "--data", id="the-data-file"),
    pytest.param(lambda tmp, adapter: _link(tmp / "d.jsonl", tmp / "link.json", os.symlink),
                 "--data", id="a-symbolic-link-to-the-data"),
    pytest.param(lambda tmp, adapter: _link(tmp / "d.jsonl", tmp / "hard.json", os.link),
                 "--data", id="a-hard-link-to-the-data"),
    pytest.param(lambda tmp, adapter: tmp / "c.json", "--config", id="the-config-file"),
    pytest.param(lambda tmp, adapter: adapter / "adapter_model.safetensors",
                 "the adapter's weights", id="the-adapter-weights"),
    pytest.param(lambda tmp, adapter: adapter / "moa_config.json", "the adapter's config",
                 id="the-adapter-config"),
])
def test_an_out_that_is_an_input_is_refused_even_with_overwrite(make_out, names, tmp_path,
                                                                 adapter_dir, capsys,
                                                                 no_loading):
    data = _data_file(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 2}))
    out = make_out(tmp_path, adapter_dir)
    before = {path: path.read_bytes() for path in (data, tmp_path / "c.json",
                                                   *adapter_dir.iterdir())}
    err = one_line_error(capsys, ["evaluate", "--data", str(data), "--adapter",
                                  str(adapter_dir), "--config", str(tmp_path / "c.json"),
                                  "--out", str(out), "--overwrite"])
    assert f"--out {str(out)!r} is {names} " in err
    assert "the results would destroy an input; name another file" in err
    assert before == {path: path.read_bytes() for path in before}


def _link(target: Path, link: Path, make) -> Path:
    make(target, link)
    return link


def test_an_existing_out_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys,
                                                                           monkeypatch):
    data, out = _data_file(tmp_path), tmp_path / "r.json"
    out.write_text("another run's results\n")
    with monkeypatch.context() as patch:
        patch.setattr("moa.cli.loading.load_tokenizer", _fail_loading)
        err = one_line_error(capsys, ["evaluate", "--data", str(data), "--out", str(out)])
    assert f"--out {str(out)!r} already exists (another run's results?); give --overwrite " \
           "to replace it, or another --out" in err
    assert out.read_text() == "another run's results\n"
    (tmp_path / "c.yaml").write_text("overwrite: true\n")  # a config key too
    run(["evaluate", "--data", str(data), "--config", str(tmp_path / "c.yaml"),
         "--out", str(out)], capsys)
    assert json.loads(out.read_text())["records"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "d.jsonl", "r.json"]


def _fail_loading(*args, **kwargs):
    raise AssertionError("loaded before --out was checked")


def _can_create_in(folder: Path) -> bool:
    try:
        handle, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder where this user cannot create a file: a read-only one, or for root (whom
    permissions do not stop) /sys where it refuses root too."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if _can_create_in(folder):
        folder = Path("/sys")
        if not folder.is_dir() or _can_create_in(folder):
            pytest.skip("no folder here refuses this user's writes")
    yield folder
    (tmp_path / "read-only").chmod(0o700)


@pytest.mark.parametrize("inside", [
    pytest.param("", id="in-the-folder"),
    pytest.param("new/deeper", id="in-folders-still-to-be-made"),
])
def test_an_out_that_cannot_be_written_fails_before_anything_loads(inside, tmp_path,
                                                                   unwritable_folder, capsys,
                                                                   no_loading):
    out = unwritable_folder / inside / "r.json"
    err = one_line_error(capsys, ["evaluate", "--data", str(_data_file(tmp_path)),
                                  "--out", str(out)])
    assert f"cannot write --out {str(out)!r}: no file can be created in " \
           f"{str(unwritable_folder)!r}" in err


def test_an_out_that_is_a_device_is_refused(tmp_path, capsys, no_loading):
    err = one_line_error(capsys, ["evaluate", "--data", str(_data_file(tmp_path)), "--out",
                                  os.devnull, "--overwrite"])
    assert f"--out {os.devnull!r} is not a regular file; name a JSON file" in err


def test_a_failed_write_leaves_the_old_results_whole(tmp_path, capsys, monkeypatch):
    data, out = _data_file(tmp_path), tmp_path / "r.json"
    out.write_text("the old results\n")

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    err = one_line_error(capsys, ["evaluate", "--data", str(data), "--out", str(out),
                                  "--overwrite"])
    assert "No space left on device" in err
    assert out.read_text() == "the old results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "r.json"]  # no temp


def test_an_out_that_appears_while_scoring_is_left_alone(tmp_path, capsys, monkeypatch):
    import moa.cli.evaluate

    data, out = _data_file(tmp_path), tmp_path / "r.json"
    score = moa.cli.evaluate.evaluate_items

    def another_run_writes_out(*args, **kwargs):
        out.write_text("another run's results\n")
        return score(*args, **kwargs)

    monkeypatch.setattr(moa.cli.evaluate, "evaluate_items", another_run_writes_out)
    err = one_line_error(capsys, ["evaluate", "--data", str(data), "--out", str(out)])
    assert f"--out {str(out)!r} appeared while this run was scoring; its results are in " in err
    assert out.read_text() == "another run's results\n"
    kept = Path(err.split("its results are in ")[1].strip().strip("'"))
    assert json.loads(kept.read_text())["records"] == 1


# ---- --backend -------------------------------------------------------------------------------

def test_an_adapter_saved_with_triton_is_evaluated_on_the_cpu_with_backend_torch(
        tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU without the Triton interpreter
    base = build_text_model()
    torch.manual_seed(0)
    moa = get_moa_model(base, MoAConfig.preset("soft_moa", backend="triton"))
    perturb(moa)
    moa.save_pretrained(tmp_path / "triton")
    moa.moa_config.backend = "torch"
    moa.save_pretrained(tmp_path / "torch")  # the same tensors, saved with torch
    data = write_records(tmp_path / "d.jsonl", [
        {"question": "Which is a metal?", "choices": ["iron", "wood", "glass"], "answer": 0}])
    err = one_line_error(capsys, ["evaluate", "--data", data, "--adapter",
                                  str(tmp_path / "triton"), "--out", str(tmp_path / "r.json")])
    assert "was saved with backend 'triton', which runs triton kernels: a CUDA GPU (or " \
           "TRITON_INTERPRET=1) is needed, and this run is on cpu; give --backend torch " \
           "(or auto) to evaluate it here" in err
    run(["evaluate", "--data", data, "--adapter", str(tmp_path / "triton"), "--backend",
         "torch", "--out", str(tmp_path / "r.json")], capsys)
    run(["evaluate", "--data", data, "--adapter", str(tmp_path / "torch"),
         "--out", str(tmp_path / "t.json")], capsys)
    scores = [json.loads((tmp_path / name).read_text())["predictions"][0]["log_likelihoods"]
              for name in ("r.json", "t.json")]
    assert scores[0] == scores[1] and all(math.isfinite(s) for s in scores[0])
    assert json.loads((tmp_path / "r.json").read_text())["backend"] == "torch"
    err = one_line_error(capsys, ["evaluate", "--data", data, "--adapter",
                                  str(tmp_path / "torch"), "--backend", "triton",
                                  "--out", str(tmp_path / "x.json")])
    assert "--backend triton runs triton kernels" in err and "give --backend torch" in err
