"""Bad inputs and the errors they must give, as one table.

Each row is pytest.param(make, ExpectedError, fragment, id=...): calling make() (no
arguments) must raise ExpectedError, or a subclass, with `fragment` in its message. The id
says what the row covers. To add a case, append a row; helpers that build what a row needs
sit above the table. A `moa` command runs through `cli`, which turns a non-zero exit into
CommandFailed (after checking that stderr is one line and not a traceback).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from moa import ExpertSpec, MoAConfig, MoALinear, get_moa_model
from moa.cli import main
from moa.cli.data import (
    CUT_MARGIN_TOKENS,
    DataError,
    MultipleChoiceItem,
    evaluation_item,
    longest_token_chars,
    training_example,
)
from moa.cli.loading import build_text_model, byte_tokenizer
from tests.moa.tiny import tiny_llama


class CommandFailed(Exception):
    """`moa ...` exited non-zero; the message is its exit status and stderr."""


def cli(*argv: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(list(argv))
    text = err.getvalue()
    if status != 0:
        assert text.startswith("moa: error: ") and text.count("\n") == 1, text
        raise CommandFailed(f"exit {status}: {text}")


def inject(model=None, **config):
    """get_moa_model on a fresh 2-layer tiny Llama (or `model`) with MoAConfig(**config)."""
    return get_moa_model(tiny_llama() if model is None else model, MoAConfig(**config))


def layer(experts=("lora:2",), **options) -> MoALinear:
    """A MoALinear over nn.Linear(8, 4) without a router (gates come from outside)."""
    return MoALinear(nn.Linear(8, 4), list(experts), router=None, **options)


def peft_model():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))


def demo_into(prepare) -> None:
    """`moa demo --steps 1 --out D` after prepare(D) has set up a fresh folder D."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        prepare(out)
        cli("demo", "--steps", "1", "--out", str(out))


def in_folder(run) -> None:
    """run(D) in a fresh temporary folder D holding d.jsonl (two multiple-choice records)
    and c.json (a --config file of one option)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_jsonl(folder / "d.jsonl", [{"question": "Which is a metal?",
                                          "choices": ["iron", "wood"], "answer": 0},
                                         {"question": "Which is wet?",
                                          "choices": ["sand", "water"], "answer": 1}])
        (folder / "c.json").write_text(json.dumps({"batch_size": 2}))
        run(folder)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def evaluate_into(out, *flags: str) -> None:
    """`moa evaluate` of d.jsonl (with --config c.json) into out(D), in a fresh folder D."""
    in_folder(lambda tmp: cli("evaluate", "--data", str(tmp / "d.jsonl"), "--config",
                              str(tmp / "c.json"), "--out", str(out(tmp)), *flags))


def evaluate_adapter_into(out) -> None:
    """`moa evaluate --adapter D/adapter --overwrite` into out(D/adapter)."""
    def run(tmp: Path) -> None:
        get_moa_model(build_text_model(), MoAConfig.preset("lora")).save_pretrained(
            tmp / "adapter")
        cli("evaluate", "--data", str(tmp / "d.jsonl"), "--adapter", str(tmp / "adapter"),
            "--out", str(out(tmp / "adapter")), "--overwrite")

    in_folder(run)


def symlink_to(target: Path, link: Path) -> Path:
    link.symlink_to(target)
    return link


def command_on_records(command: str, records: list[dict] | str, *flags: str) -> None:
    """`moa COMMAND --data D/d.jsonl --out D/out ...` where d.jsonl holds `records` (a list
    of records, or the file's text)."""
    def run(tmp: Path) -> None:
        data = tmp / "d.jsonl"
        if isinstance(records, str):
            data.write_text(records)
        else:
            write_jsonl(data, records)
        cli(command, "--data", str(data), "--out", str(tmp / "out"), *flags)

    in_folder(run)


def command_on_data_path(command: str, path, *flags: str) -> None:
    """`moa COMMAND --data path(D) --out D/out ...` in a fresh folder D."""
    in_folder(lambda tmp: cli(command, "--data", str(path(tmp)), "--out", str(tmp / "out"),
                              *flags))


def train_on_a_fifo() -> None:
    from tests.moa.cli.test_data import fifo_unblocked_after

    with tempfile.TemporaryDirectory() as tmp, \
            fifo_unblocked_after(Path(tmp) / "pipe.jsonl", seconds=20) as fifo:
        cli("train", "--data", str(fifo), "--out", str(Path(tmp) / "out"))


def _weights_path_is_a_directory(out: Path) -> None:
    (out / "adapter" / "adapter_model.safetensors").mkdir(parents=True)


def _out_is_a_file(out: Path) -> None:
    out.write_text("not a folder")


DIGITS_ONLY = "must be written with the digits 0-9 only"
PLAIN_DECIMAL = "must be a plain decimal number such as 16 or 0.5"
LAYERS_ALLOWED = "layers_to_transform must be None or a non-empty list of layer indices"
Q_PROJ_0 = "model.layers.0.self_attn.q_proj"

BAD_INPUTS = [
    # ---- expert strings: numbers int() / float() take but nobody means -------------------
    pytest.param(lambda: ExpertSpec.parse("lora:8_0"), ValueError,
                 f"lora rank '8_0' {DIGITS_ONLY}", id="expert-rank-underscore-is-not-80"),
    pytest.param(lambda: ExpertSpec.parse("lora:\u0668"), ValueError,
                 f"lora rank '\u0668' {DIGITS_ONLY}", id="expert-rank-arabic-indic-digit"),
    pytest.param(lambda: ExpertSpec.parse("lora: 8"), ValueError,
                 f"lora rank ' 8' {DIGITS_ONLY}", id="expert-rank-space-inside"),
    pytest.param(lambda: ExpertSpec.parse("lora:+8"), ValueError,
                 f"lora rank '+8' {DIGITS_ONLY}", id="expert-rank-plus-sign"),
    pytest.param(lambda: ExpertSpec.parse("adapter:1_6"), ValueError,
                 f"adapter size '1_6' {DIGITS_ONLY}", id="expert-adapter-size-underscore"),
    pytest.param(lambda: ExpertSpec.parse("hydra:8:8_0"), ValueError,
                 f"hydra heads '8_0' {DIGITS_ONLY}", id="expert-hydra-heads-underscore"),
    pytest.param(lambda: ExpertSpec.parse("lora:8:1e308"), ValueError,
                 f"alpha '1e308' {PLAIN_DECIMAL}", id="expert-alpha-exponent"),
    pytest.param(lambda: ExpertSpec.parse("lora:8:nan"), ValueError,
                 f"alpha 'nan' {PLAIN_DECIMAL}", id="expert-alpha-nan"),
    pytest.param(lambda: ExpertSpec.parse("hydra:8:2:inf"), ValueError,
                 f"alpha 'inf' {PLAIN_DECIMAL}", id="expert-alpha-inf"),
    pytest.param(lambda: ExpertSpec.parse("lora:8:1_0"), ValueError,
                 f"alpha '1_0' {PLAIN_DECIMAL}", id="expert-alpha-underscore"),
    pytest.param(lambda: ExpertSpec.parse("lora:8:100000"), ValueError,
                 "alpha must be at most 65504 (the largest float16",
                 id="expert-alpha-above-the-bound"),
    pytest.param(lambda: ExpertSpec.lora(8, 1e308), ValueError,
                 "alpha must be at most 65504", id="expertspec-alpha-1e308"),
    # ---- MoAConfig fields of the wrong type ---------------------------------------------
    pytest.param(lambda: MoAConfig(dropout="0.1"), ValueError,
                 "dropout must be a number in [0, 1) such as 0.1 (0 for none), got '0.1', "
                 "a str", id="dropout-as-a-string"),
    pytest.param(lambda: MoAConfig(dropout=None), ValueError,
                 "dropout must be a number in [0, 1) such as 0.1 (0 for none), got None",
                 id="dropout-none"),
    pytest.param(lambda: MoAConfig(dropout=True), ValueError, "got True, a bool",
                 id="dropout-bool"),
    pytest.param(lambda: MoAConfig(layers_to_transform=1.0), ValueError,
                 f"{LAYERS_ALLOWED} (integers >= 0; one integer for a single layer), got 1.0, "
                 "a float", id="layers-to-transform-a-float"),
    pytest.param(lambda: MoAConfig(layers_to_transform="0,1"), ValueError,
                 f"{LAYERS_ALLOWED} (integers >= 0; one integer for a single layer), got "
                 "'0,1', a str", id="layers-to-transform-a-string"),
    pytest.param(lambda: MoAConfig(layers_to_transform=[0, 1.0]), ValueError,
                 "got [0, 1.0]: 1.0 is a float", id="layers-to-transform-a-float-entry"),
    # ---- injection: what the config names must exist in the model ------------------------
    pytest.param(lambda: inject(layers_to_transform=[0, 99]), ValueError,
                 "layers_to_transform=[0, 99] names layer 99, which this LlamaForCausalLM "
                 "does not have; the model's layers are [0, 1]", id="layers-beyond-the-model"),
    pytest.param(lambda: inject(experts={"*": ["lora:4"], "q_porj": ["lora:8"]}), ValueError,
                 "experts key 'q_porj' matches no adapted module, so its experts would never "
                 "be used", id="experts-key-typo"),
    pytest.param(lambda: inject(experts={"*": ["lora:4"], "q_porj": ["lora:8"]}), ValueError,
                 "Did you mean 'q_proj'", id="experts-key-typo-names-what-it-could-mean"),
    pytest.param(lambda: inject(experts={"*": ["lora:4"], "self_attn.q_porj": ["lora:8"]}),
                 ValueError, "Did you mean 'self_attn.q_proj'", id="experts-dotted-key-typo"),
    pytest.param(lambda: inject(experts={"*": ["lora:4"], "gate_proj": ["lora:8"]}),
                 ValueError, "It names 'model.layers.0.mlp.gate_proj', which target_modules "
                 "and exclude_modules leave unadapted", id="experts-key-of-an-untargeted-module"),
    pytest.param(lambda: inject(layers_to_transform=[0],
                                experts={"*": ["lora:4"], "layers.1.self_attn.q_proj": ["lora:8"]}),
                 ValueError, "It names only modules outside layers_to_transform=[0]",
                 id="experts-key-outside-layers-to-transform"),
    pytest.param(lambda: inject(target_modules=".*"), ValueError,
                 "target_modules match 'model', a LlamaModel; only nn.Linear modules can be "
                 "adapted (the regex '.*' must match nn.Linear names only, such as "
                 f"'{Q_PROJ_0}')", id="regex-matching-everything-names-a-real-module"),
    pytest.param(lambda: inject(peft_model().base_model.model, target_modules=["q_proj"]),
                 ValueError, f"target_modules match '{Q_PROJ_0}', which is already wrapped by "
                 "PEFT (a peft.tuners.lora.layer.Linear); adapt the base model, not a PEFT "
                 "model", id="peft-wrapped-target"),
    pytest.param(lambda: inject(peft_model(), target_modules=["q_proj"]), ValueError,
                 "which is already wrapped by PEFT", id="peft-model-given"),
    pytest.param(lambda: inject(peft_model(), target_modules=r".*lora_A\.default"), ValueError,
                 "which is already wrapped by PEFT (inside "
                 f"'base_model.model.{Q_PROJ_0}'", id="peft-internal-linear-targeted"),
    # ---- MoALinear: the layer and its inputs ---------------------------------------------
    pytest.param(lambda: layer()(torch.randn(3, 8), [[0.5]] * 3), TypeError,
                 "gates must be a tensor of shape (3, 1), got list", id="gates-as-a-list"),
    pytest.param(lambda: layer()(torch.randn(3, 8), torch.ones(3, 1, device="meta")),
                 ValueError, "gates are on meta, the input on cpu; put them on the same device",
                 id="gates-on-another-device"),
    pytest.param(lambda: layer()(torch.randn(3, 8), torch.ones(3, 1, dtype=torch.int64)),
                 TypeError, "gates must be a floating-point tensor, got torch.int64",
                 id="integer-gates"),
    pytest.param(lambda: layer(dropout="0.1"), ValueError,
                 "dropout must be a number in [0, 1), got '0.1'", id="layer-dropout-as-string"),
    pytest.param(lambda: layer(dropout=None), ValueError,
                 "dropout must be a number in [0, 1), got None", id="layer-dropout-none"),
    pytest.param(lambda: layer(adapter_dtype=torch.int8), ValueError,
                 "adapter_dtype must be a floating torch.dtype, 'base' or None, got "
                 "torch.int8", id="adapter-dtype-not-floating"),
    pytest.param(lambda: layer(adapter_dtype="float32"), ValueError,
                 "adapter_dtype must be a floating torch.dtype, 'base' or None, got "
                 "'float32'", id="adapter-dtype-as-string"),
    pytest.param(lambda: MoALinear(nn.Linear(0, 4), ["lora:2"]), ValueError,
                 "has in_features=0 and out_features=4; both must be >= 1",
                 id="linear-with-no-inputs"),
    pytest.param(lambda: MoALinear(nn.Linear(8, 4, device="meta"), ["lora:2"])(
                     torch.randn(3, 8, device="meta")), ValueError,
                 "MoALinear cannot run on meta tensors (they hold no values); materialise",
                 id="meta-tensors"),
    pytest.param(lambda: layer()(torch.randn(3, 8, dtype=torch.float64),
                                 torch.ones(3, 1, dtype=torch.float64)), TypeError,
                 "input dtype torch.float64 differs from the base weight's torch.float32 "
                 "(nn.Linear refuses this too)", id="input-dtype-other-than-the-base"),
    pytest.param(lambda: MoALinear(layer(), ["lora:2"]), TypeError,
                 "the base is already a MoALinear; adapt its .base instead",
                 id="moalinear-as-base"),
    pytest.param(lambda: MoALinear(nn.Conv1d(8, 4, 1), ["lora:2"]), TypeError,
                 "integer `in_features` and `out_features` attributes", id="conv-as-base"),
    pytest.param(lambda: layer(["lora:2", "lora:4"]).load_state_dict(
                     layer(["lora:4", "lora:2"]).state_dict()), ValueError,
                 "the state_dict holds other experts ([lora:4:alpha=4, lora:2:alpha=2]) than "
                 "this layer ([lora:2, lora:4])", id="state-dict-of-permuted-experts"),
    pytest.param(lambda: layer(["lora:8:8"]).load_state_dict(
                     layer(["lora:8:64"]).state_dict()), ValueError,
                 "holds other experts ([lora:8:alpha=64])", id="state-dict-of-rescaled-experts"),
    # ---- the moa command: one line, non-zero exit ----------------------------------------
    pytest.param(lambda: demo_into(_weights_path_is_a_directory), CommandFailed,
                 "exit 1: moa: error: cannot write the demo's output ",
                 id="demo-out-weights-path-is-a-directory"),
    pytest.param(lambda: demo_into(_out_is_a_file), CommandFailed,
                 "is a file, not a directory", id="demo-out-is-a-file"),
    # ---- an output that would destroy an input: refused, --overwrite or not --------------
    pytest.param(lambda: evaluate_into(lambda tmp: tmp / "d.jsonl", "--overwrite"),
                 CommandFailed, "is --data ", id="evaluate-out-is-the-data"),
    pytest.param(lambda: evaluate_into(lambda tmp: tmp / "sub" / ".." / "d.jsonl"),
                 CommandFailed, "is --data ", id="evaluate-out-is-the-data-through-dotdot"),
    pytest.param(lambda: evaluate_into(lambda tmp: symlink_to(tmp / "d.jsonl", tmp / "r.json"),
                                       "--overwrite"),
                 CommandFailed, "is --data ", id="evaluate-out-is-a-link-to-the-data"),
    pytest.param(lambda: evaluate_into(lambda tmp: tmp / "c.json", "--overwrite"),
                 CommandFailed, "is --config ", id="evaluate-out-is-the-config-file"),
    pytest.param(lambda: evaluate_adapter_into(lambda adapter: adapter /
                                               "adapter_model.safetensors"),
                 CommandFailed, "is the adapter's weights ",
                 id="evaluate-out-is-the-adapter-weights"),
    pytest.param(lambda: evaluate_into(lambda tmp: (tmp / "r.json").write_text("{}") and
                                       tmp / "r.json"),
                 CommandFailed, "already exists (another run's results?); give --overwrite",
                 id="evaluate-out-holds-another-run"),
    pytest.param(lambda: evaluate_into(lambda tmp: Path(os.devnull), "--overwrite"),
                 CommandFailed, "is not a regular file", id="evaluate-out-is-a-device"),
    # ---- data paths that are not regular files: said so, never opened ---------------------
    pytest.param(lambda: command_on_data_path("evaluate", lambda tmp: tmp), CommandFailed,
                 "is a directory, not a JSON or JSONL data file", id="evaluate-data-directory"),
    pytest.param(lambda: command_on_data_path("evaluate", lambda tmp: os.devnull),
                 CommandFailed, "is not a regular file (it is a character device)",
                 id="evaluate-data-dev-null"),
    pytest.param(lambda: command_on_data_path("train", lambda tmp: os.devnull), CommandFailed,
                 "is not a regular file (it is a character device)", id="train-data-dev-null"),
    pytest.param(lambda: command_on_data_path("train", lambda tmp: tmp / "d.jsonl",
                                              "--eval-data", "/"), CommandFailed,
                 "/ is a directory, not a JSON or JSONL data file",
                 id="train-eval-data-directory"),
    pytest.param(train_on_a_fifo, CommandFailed, "is not a regular file (it is a FIFO",
                 id="train-data-fifo-refused-without-blocking"),
    # ---- choices that repeat a text -----------------------------------------------------
    pytest.param(lambda: evaluation_item({"question": "q", "choices": ["a", "a"],
                                          "answer": 0}, "r"), DataError,
                 "r: 'choices' 0 and 1 (from 0) are the same text 'a'", id="choices-repeat"),
    pytest.param(lambda: evaluation_item({"question": "q", "choices": ["a", " a\n"],
                                          "answer": 0}, "r"), DataError,
                 "are the same text 'a'", id="choices-repeat-but-for-spaces"),
    pytest.param(lambda: evaluation_item({"prompt": "p", "choices": ["b", "a", "b"],
                                          "answer": 0}, "r"), DataError,
                 "'choices' 0 and 2 (from 0) are the same text 'b'",
                 id="prompt-choices-repeat"),
    pytest.param(lambda: evaluation_item({"instruction": "Answer format: yes/no/yes",
                                          "answer": "yes"}, "r"), DataError,
                 "the instruction's answer labels 0 and 2 (from 0) are the same text 'yes'",
                 id="published-labels-repeat"),
    pytest.param(lambda: training_example({"question": "q", "choices": ["a", "a"],
                                           "answer": 1}, "r"), DataError,
                 "are the same text 'a'", id="training-choices-repeat"),
    # ---- numbers that are not finite ------------------------------------------------------
    pytest.param(lambda: command_on_records("train", '{"question": "q", "answer": NaN}\n'),
                 CommandFailed, "record 1: 'answer' is nan, not a finite number",
                 id="train-answer-nan"),
    pytest.param(lambda: command_on_records("train", '{"question": "q", "answer": 1e999}\n'),
                 CommandFailed, "record 1: 'answer' is inf, not a finite number",
                 id="train-answer-overflows-to-inf"),
    pytest.param(lambda: command_on_records("evaluate", '{"question": "q", '
                                                        '"answer": -Infinity}\n'),
                 CommandFailed, "record 1: 'answer' is -inf, not a finite number",
                 id="evaluate-answer-minus-infinity"),
    # ---- a --max-length that leaves nothing to learn or tells no choices apart ------------
    pytest.param(lambda: command_on_records("train", [{"prompt": "Q: sky?\nA:",
                                                       "completion": " blue"}],
                                            "--max-length", "1"), CommandFailed,
                 "no usable record (1 records: 1 with no room for a response within "
                 "--max-length 1)", id="train-max-length-1"),
    pytest.param(lambda: command_on_records("evaluate", [{"question": "q", "choices": ["x",
                                                                                      "y"],
                                                          "answer": 1}],
                                            "--max-length", "1"), CommandFailed,
                 "record 1: choices 0 and 1 (from 0) begin with the same 1 tokens, all that "
                 "--max-length 1 keeps of a choice (half of it), so their scores would tie; "
                 "give --max-length 4 or more", id="evaluate-max-length-1-ties-every-choice"),
]


@pytest.mark.parametrize("make, expected_error, fragment", BAD_INPUTS)
def test_bad_input_fails_clearly(make, expected_error, fragment):
    with pytest.raises(expected_error, match=re.escape(fragment)):
        make()


# ---- property and fuzz tests of the classes above ----------------------------------------------

SCORES = st.sampled_from([float("nan"), float("inf"), float("-inf")]) | \
    st.floats(-50.0, 0.0)


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.lists(SCORES, min_size=2, max_size=4), min_size=1, max_size=6),
       data=st.data())
def test_a_score_that_is_not_finite_is_never_a_right_answer(scores, data):
    import moa.cli.evaluate

    items = [MultipleChoiceItem("c", [f" {k}" for k in range(len(row))],
                                data.draw(st.integers(0, len(row) - 1))) for row in scores]
    with mock.patch.object(moa.cli.evaluate, "score_multiple_choice", lambda *a, **k: scores):
        result = moa.cli.evaluate.evaluate_items(None, None, items, progress=False)
    bad = [not all(math.isfinite(x) for x in row) for row in scores]
    for prediction, is_bad in zip(result["predictions"], bad):
        assert prediction["non_finite"] is is_bad
        assert not (is_bad and prediction["correct"])
    assert result["non_finite"] == sum(bad)
    assert result["accuracy"] * len(items) <= len(items) - sum(bad) + 1e-9
    json.dumps(moa.cli.evaluate._json_safe(result), allow_nan=False)  # strict JSON


def counted_commands(tmp: Path, command: list[str]) -> list[int]:
    """The lengths of every text the tokenizer is given while `moa` runs `command`."""
    from tests.moa.cli.test_data import CountingTokenizer

    tokenizer = CountingTokenizer(byte_tokenizer())
    with mock.patch("moa.cli.loading.load_tokenizer", lambda path: tokenizer):
        cli(*command)
    return tokenizer.lengths


def test_a_huge_record_costs_what_max_length_allows(tmp_path):
    # 8 MB of question and 2 MB of answer: only pieces that --max-length bounds are
    # tokenised, in training and in evaluation (was: the whole text, 80-90 s for 50 MB)
    question = "the quick brown fox " * 400_000 + "which is a metal?"
    records = [{"question": question, "choices": ["iron" + " ore" * 500_000, "wood"],
                "answer": 0}, {"question": question[-2000:], "answer": 3}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    bound = 2 * (64 + 1 + CUT_MARGIN_TOKENS) * longest_token_chars(byte_tokenizer())
    lengths = counted_commands(tmp_path, ["train", "--data", str(data), "--steps", "1",
                                          "--max-length", "64", "--out",
                                          str(tmp_path / "run")])
    assert max(lengths) <= bound, (max(lengths), bound)
    lengths = counted_commands(tmp_path, ["evaluate", "--data", str(data), "--max-length",
                                          "64", "--max-new-tokens", "2", "--out",
                                          str(tmp_path / "r.json")])
    assert max(lengths) <= bound, (max(lengths), bound)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(choices=st.lists(st.text("ab ", min_size=1, max_size=6).filter(str.strip),
                        min_size=2, max_size=4, unique_by=str.strip),
       max_length=st.integers(1, 16))
def test_scored_choices_never_tie_by_the_cut(choices, max_length):
    """Either the choices' kept tokens differ, or the refusal names a --max-length that
    tells them apart."""
    from moa.cli.evaluate import score_multiple_choice

    item = MultipleChoiceItem("Question: q?\nAnswer:", [" " + c for c in choices], 0)
    model, tokenizer, cpu = TEXT_MODEL, byte_tokenizer(), torch.device("cpu")
    try:
        scores = score_multiple_choice(model, tokenizer, [item], 1, max_length, cpu,
                                       progress=False)[0]
    except ValueError as error:
        needed = int(re.search(r"give --max-length (\d+) or more", str(error)).group(1))
        assert needed > max_length
        scores = score_multiple_choice(model, tokenizer, [item], 1, needed, cpu,
                                       progress=False)[0]
    assert len(set(scores)) == len(scores)


TEXT_MODEL = build_text_model()


# ---- moa train and moa demo: output folders, checkpoints, conflicting options ------------
#
# Rows as above; each `make` gets a fresh folder to prepare its inputs in. None of them
# trains: every refusal comes before a model loads.

def _records(folder: Path) -> str:
    path = folder / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    return str(path)


def in_empty_folder(make):
    """make(folder) in a fresh temporary folder, as a BAD_INPUTS row's make()."""
    def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            make(Path(tmp))
    return run


def _another_run(folder: Path) -> Path:
    """An --out holding what a finished `moa train` leaves (empty stand-ins)."""
    out = folder / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "adapter").mkdir()
    (out / "adapter" / "moa_config.json").write_text("{}")
    (out / "log_history.json").write_text("[]")
    return out


def _config(folder: Path, text: str) -> str:
    path = folder / "c.yaml"
    path.write_text(text.format(data=_records(folder)), encoding="utf-8")
    return str(path)


def _checkpoint_lacking(folder: Path, name: str) -> str:
    checkpoint = folder / "checkpoint-4"
    checkpoint.mkdir()
    for file in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "moa_config.json",
                 "adapter_model.safetensors"):
        if file != name:
            (checkpoint / file).write_text("{}")
    return str(checkpoint)


TRAIN_BAD_INPUTS = [
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--out",
                                         str(_another_run(f)))), CommandFailed,
                 "holds another run (adapter/, checkpoints/, log_history.json): continue it "
                 "with --resume last, or replace it with --overwrite",
                 id="train-out-holds-another-run"),
    pytest.param(in_empty_folder(lambda f: cli("demo", "--steps", "1", "--out",
                                         str(_another_run(f)))), CommandFailed,
                 "holds another run (adapter/, checkpoints/, log_history.json): replace it "
                 "with --overwrite", id="demo-out-holds-a-train-run"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--out", str(f))),
                 CommandFailed, "holds the input --data", id="train-out-holds-the-data"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--out",
                                         str(_another_run(f)), "--resume", "last",
                                         "--overwrite")), CommandFailed,
                 "--overwrite and --resume last conflict", id="train-overwrite-and-resume"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--out",
                                         str(_another_run(f)), "--resume", "last")),
                 CommandFailed, "--resume last: no checkpoint in",
                 id="train-resume-last-passes-over-a-checkpoint-lacking-files"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--resume",
                                         _checkpoint_lacking(f, "optimizer.pt"))),
                 CommandFailed, "is not a whole checkpoint: it lacks optimizer.pt",
                 id="train-resume-dir-without-its-optimizer"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--config", _config(
                     f, "data: {data}\npreset: lora\nmoa_config: m.json\n"))), CommandFailed,
                 "--preset lora (from the --config file", id="train-config-preset-and-moa-config"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--config", _config(
                     f, "data: {data}\neval-data: {data}\neval_data: {data}\n"))),
                 CommandFailed, "'eval-data' and 'eval_data' are the same option",
                 id="train-config-option-under-two-spellings"),
    pytest.param(in_empty_folder(lambda f: cli("train", "--data", _records(f), "--device",
                                         "cuda:7" if not torch.cuda.is_available()
                                         else f"cuda:{torch.cuda.device_count()}")),
                 CommandFailed, "--device cuda:", id="train-device-gpu-that-is-not-there"),
]


@pytest.mark.parametrize("make, expected_error, fragment", TRAIN_BAD_INPUTS)
def test_bad_train_and_demo_input_fails_clearly(make, expected_error, fragment):
    with pytest.raises(expected_error, match=re.escape(fragment)):
        make()
