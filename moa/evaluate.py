"""`moa evaluate`: accuracy of a model, with or without a MoA adapter, on a data file.

Multiple choice (moa/data.py's formats): every choice is scored by the sum of its tokens'
log-probabilities after the prompt, the prompt run once per record (a KV cache shared by
its choices), records batched by prompt length; the prediction is the best choice
("accuracy"), and the best choice after dividing by its length in characters
("accuracy_norm", as LM evaluation harnesses do). Arithmetic: greedy generation from the
prompt in batches padded on the left (generate gives the positions that skip the padding);
the response is cut at the end-of-text token or where a new prompt begins, and its last
number must equal the answer within 1e-3, as the published evaluation checks.

Output: a table on stdout and a JSON file whose top level has "accuracy" (over every
record; multiple choice counts its unnormalised prediction), "records", per task
"accuracy" (and "accuracy_norm"), and per record the prediction.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moa.data import (
    ArithmeticItem,
    MultipleChoiceItem,
    extract_number,
    load_evaluation_items,
    split_context,
)
from moa.train import Option, add_options, count, device, merge_options, positive_int, text

# Where a response stops: the start of a new prompt of moa/data.py's templates.
STOP_TEXTS = ("\nQuestion:", "### Instruction", "### Input", "### Response")
TOLERANCE = 1e-3

EVALUATE_OPTIONS: tuple[Option, ...] = (
    Option("model", text, None, "a local transformers checkpoint directory or a .gguf file; "
           "none: the embedded text model", "PATH"),
    Option("adapter", text, None, "a MoA adapter directory (what save_pretrained wrote, e.g. "
           "moa train's OUT/adapter); none: the base model alone", "DIR"),
    Option("data", text, None, "evaluation records, JSON or JSONL (required)", "FILE"),
    Option("out", text, "moa-eval.json", "the results as JSON", "RESULTS.json"),
    Option("batch_size", positive_int, 16, "records (prompts) per forward pass", "B"),
    Option("max_new_tokens", positive_int, 128, "tokens generated at most per arithmetic "
           "answer", "N"),
    Option("max_length", positive_int, 1024, "tokens per scored sequence at most (the "
           "prompt's start is cut first)", "N"),
    Option("limit", count, None, "evaluate the first N records only", "N"),
    Option("device", device, "auto", "auto (a CUDA GPU when there is one), cpu or cuda"),
)


@dataclass
class EvaluateOptions:
    """What `moa evaluate` runs with; the fields are EVALUATE_OPTIONS' names and defaults."""

    data: str | None = None
    model: str | None = None
    adapter: str | None = None
    out: str = "moa-eval.json"
    batch_size: int = 16
    max_new_tokens: int = 128
    max_length: int = 1024
    limit: int | None = None
    device: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluateOptions:
        """The options of parsed `moa evaluate` flags (with their --config file)."""
        options = cls(**merge_options(args, EVALUATE_OPTIONS))
        if options.data is None:
            raise ValueError("moa evaluate needs --data FILE (a flag or a 'data' key of "
                             "--config)")
        return options


@dataclass
class EvaluationResult:
    """Accuracy over every record, per task, per record, and the wall time."""

    accuracy: float
    records: int
    tasks: dict[str, dict]
    predictions: list[dict]
    seconds: float
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------

def _leading_specials(tokenizer, ids: list[int]) -> int:
    special = set(tokenizer.all_special_ids)
    count_ = 0
    while count_ < len(ids) - 1 and ids[count_] in special:
        count_ += 1
    return count_


def _fit(context: list[int], keep: int, room: int) -> list[int]:
    """context within `room` tokens: its first `keep` (special) tokens stay, the start of
    the rest goes first."""
    if len(context) <= room:
        return context
    return context[:keep] + context[len(context) - (room - keep):]


def _accepts(model, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


@torch.no_grad()
def score_multiple_choice(model, tokenizer, items: list[MultipleChoiceItem], batch_size: int,
                          max_length: int, device: torch.device,
                          progress: bool = True) -> list[list[float]]:
    """Per item, per continuation: the sum of the continuation's token log-probabilities
    after the context (float64 sums of float32 log-softmax values).

    Each context runs once: a batch of `batch_size` contexts, padded on the left (position
    ids skip the padding), fills a KV cache and gives the first continuation token's
    distribution; the cache is then repeated per choice and the continuations' remaining
    tokens run on it, padded on the right. A choice is scored as if after its context alone.
    """
    from tqdm import tqdm

    contexts, continuations = [], []
    for item in items:
        context_text, _ = split_context(item.context, "")
        context = tokenizer(context_text, add_special_tokens=True)["input_ids"] or \
            [tokenizer.eos_token_id]
        tokens = []
        for continuation in item.continuations:
            ids = tokenizer(split_context(item.context, continuation)[1],
                            add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"choice {continuation!r} tokenizes to nothing")
            tokens.append(ids[:max(1, max_length // 2)])
        room = max(1, max_length - max(len(t) for t in tokens))
        contexts.append(_fit(context, _leading_specials(tokenizer, context), room))
        continuations.append(tokens)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    scores = [[0.0] * len(item.continuations) for item in items]
    order = sorted(range(len(items)), key=lambda i: -len(contexts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring choices", unit="batch", disable=not progress,
                      mininterval=0.5):
        longest = max(len(contexts[i]) for i in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[row, longest - len(contexts[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), use_cache=True, **keep_last)
        first = output.logits[:, -1].float().log_softmax(-1)
        requests = [(row, i, choice) for row, i in enumerate(batch)
                    for choice in range(len(continuations[i]))]
        for row, i, choice in requests:
            scores[i][choice] = first[row, continuations[i][choice][0]].double().item()
        rest = max(len(continuations[i][choice]) for _, i, choice in requests) - 1
        if rest == 0:
            continue
        cache = output.past_key_values
        cache.reorder_cache(torch.tensor([row for row, _, _ in requests], device=device))
        tail = torch.full((len(requests), rest), tokenizer.pad_token_id, dtype=torch.long)
        tail_mask = torch.zeros((len(requests), rest), dtype=torch.long)
        for r, (_, i, choice) in enumerate(requests):
            inputs = continuations[i][choice][:-1]
            tail[r, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            tail_mask[r, :len(inputs)] = 1
        rows = torch.tensor([row for row, _, _ in requests])
        full_mask = torch.cat([mask[rows], tail_mask], dim=1)
        tail_positions = mask[rows].sum(-1, keepdim=True) + torch.arange(rest)
        logits = model(input_ids=tail.to(device), attention_mask=full_mask.to(device),
                       position_ids=tail_positions.to(device), past_key_values=cache,
                       use_cache=True).logits
        for r, (_, i, choice) in enumerate(requests):
            targets = continuations[i][choice][1:]
            if targets:
                values = logits[r, :len(targets)].float().log_softmax(-1)
                picked = values.gather(1, torch.tensor(targets, device=values.device)[:, None])
                scores[i][choice] += picked.double().sum().item()
    return scores


def cut_response(response: str) -> str:
    """The response up to where a new prompt begins (STOP_TEXTS)."""
    cuts = [response.find(stop) for stop in STOP_TEXTS if stop in response]
    return response[:min(cuts)] if cuts else response


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int,
                       max_new_tokens: int, max_length: int, device: torch.device,
                       progress: bool = True) -> list[str]:
    """Greedy responses to `prompts` (special tokens dropped, cut by cut_response)."""
    from tqdm import tqdm

    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    room = max(1, max_length - max_new_tokens)
    encoded = [ids[len(ids) - room:] if len(ids) > room else ids for ids in encoded]
    responses = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress,
                      mininterval=0.5):
        longest = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, longest - len(encoded[i]):] = 1
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(batch):
            text_ = tokenizer.decode(output[row, longest:], skip_special_tokens=True)
            responses[i] = cut_response(text_)
    return responses


def evaluate_items(model, tokenizer, items: list, batch_size: int = 16,
                   max_new_tokens: int = 128, max_length: int = 1024,
                   device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Accuracy of `model` on evaluation items (moa/data.py); the dict of
    EvaluationResult's fields but the time."""
    device = torch.device(device)
    choice_items = [(i, item) for i, item in enumerate(items)
                    if isinstance(item, MultipleChoiceItem)]
    arithmetic_items = [(i, item) for i, item in enumerate(items)
                        if isinstance(item, ArithmeticItem)]
    predictions: list[dict] = [{} for _ in items]
    tasks = {}
    if choice_items:
        scores = score_multiple_choice(model, tokenizer, [item for _, item in choice_items],
                                       batch_size, max_length, device, progress)
        correct = correct_norm = 0
        for (i, item), score in zip(choice_items, scores):
            best = max(range(len(score)), key=score.__getitem__)
            normalised = [s / len(c) for s, c in zip(score, item.continuations)]
            best_norm = max(range(len(score)), key=normalised.__getitem__)
            correct += best == item.answer
            correct_norm += best_norm == item.answer
            predictions[i] = {"record": i + 1, "task": "multiple_choice",
                              "answer": item.answer, "prediction": best,
                              "prediction_norm": best_norm, "correct": best == item.answer,
                              "log_likelihoods": [round(s, 4) for s in score]}
        tasks["multiple_choice"] = {"records": len(choice_items),
                                    "accuracy": correct / len(choice_items),
                                    "accuracy_norm": correct_norm / len(choice_items)}
    if arithmetic_items:
        responses = generate_responses(model, tokenizer, [item.prompt for _, item in
                                                          arithmetic_items], batch_size,
                                       max_new_tokens, max_length, device, progress)
        correct = 0
        for (i, item), response in zip(arithmetic_items, responses):
            number = extract_number(response)
            right = number is not None and abs(number - item.answer) <= TOLERANCE
            correct += right
            predictions[i] = {"record": i + 1, "task": "arithmetic", "answer": item.answer,
                              "prediction": number, "correct": right, "response": response}
        tasks["arithmetic"] = {"records": len(arithmetic_items),
                               "accuracy": correct / len(arithmetic_items)}
    total = sum(p["correct"] for p in predictions)
    return {"accuracy": total / len(items), "records": len(items), "tasks": tasks,
            "predictions": predictions}


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter directory `path` names: itself, or its adapter/ (moa train's OUT);
    FileNotFoundError when neither holds an adapter."""
    from moa.config import CONFIG_NAME
    from moa.serialization import WEIGHTS_NAME

    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"no such adapter directory: {str(path)!r}")
    raise FileNotFoundError(f"no MoA adapter in {str(path)!r} (expected {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME}, as MoAModel.save_pretrained writes them)")


def trained_on(adapter_dir: Path) -> str:
    """The base model an adapter records ("" when it records none)."""
    from safetensors import safe_open

    from moa.serialization import WEIGHTS_NAME

    try:
        with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as handle:
            return (handle.metadata() or {}).get("base_model_name_or_path", "")
    except Exception:  # unreadable weights: from_pretrained says what is wrong with them
        return ""


def load_adapted_model(model_path: str | None, adapter: str | None, log=print):
    """The base model at model_path with the adapter (if any) loaded for inference; a
    ValueError naming both when the adapter was trained on a base it does not fit."""
    from moa.loading import load_base_model, model_description
    from moa.model import MoAModel

    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    base = load_base_model(model_path)
    if adapter_dir is None:
        return base
    recorded = trained_on(adapter_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = MoAModel.from_pretrained(base, adapter_dir, is_trainable=False)
        except ValueError as error:
            origin = f"trained on {recorded!r}" if recorded else "trained on another model"
            raise ValueError(f"the adapter in {str(adapter_dir)!r} ({origin}) does not fit "
                             f"{model_description(model_path)}: {error}") from None
    for warning in caught:
        if "was trained on" in str(warning.message):
            log(f"warning: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    return model


def format_table(tasks: dict[str, dict], accuracy: float, records: int) -> str:
    """The results as a text table: per task records, accuracy, length-normalised."""
    lines = [f"{'task':16s} {'records':>8s} {'accuracy':>9s} {'length-normalised':>18s}"]
    for name, task in tasks.items():
        norm = f"{task['accuracy_norm']:.4f}" if "accuracy_norm" in task else "-"
        lines.append(f"{name.replace('_', ' '):16s} {task['records']:8d} "
                     f"{task['accuracy']:9.4f} {norm:>18s}")
    if len(tasks) > 1:
        lines.append(f"{'all':16s} {records:8d} {accuracy:9.4f}")
    return "\n".join(lines)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_evaluate(options: EvaluateOptions, log: Callable[[str], None] = print,
                 progress: bool = True) -> EvaluationResult:
    """`moa evaluate` (see the module docstring): reads the data first (bad records fail
    before any model is loaded), then the model, the adapter and the tokenizer."""
    from moa.loading import load_tokenizer, model_description

    started = time.perf_counter()
    out = Path(options.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {options.out!r} is a directory; name a JSON file")
    for folder in out.parents:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot write {out}: {folder} is a file")
    items = load_evaluation_items(options.data)
    if options.limit is not None:
        items = items[:options.limit]
    if not items:
        raise ValueError(f"{options.data}: no usable record (--limit {options.limit})")
    tokenizer = load_tokenizer(options.model)
    model = load_adapted_model(options.model, options.adapter, log)
    target = _pick_device(options.device)
    model.to(target).eval()
    log(f"model {model_description(options.model)}"
        + (f" with the adapter {options.adapter}" if options.adapter else " (no adapter)")
        + f"; data {options.data}: {len(items)} records")
    results = evaluate_items(model, tokenizer, items, options.batch_size,
                             options.max_new_tokens, options.max_length, target, progress)
    result = EvaluationResult(results["accuracy"], results["records"], results["tasks"],
                              results["predictions"], time.perf_counter() - started)
    payload = {"accuracy": result.accuracy, "records": result.records,
               "model": model_description(options.model), "adapter": options.adapter,
               "data": options.data, "tasks": result.tasks, "seconds": result.seconds,
               "predictions": result.predictions}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    result.files.append(out)
    log(format_table(result.tasks, result.accuracy, result.records))
    log(f"results written to {out} ({result.seconds:.1f} s)")
    return result


__all__ = ["EVALUATE_OPTIONS", "EvaluateOptions", "EvaluationResult", "add_options",
           "cut_response", "evaluate_items", "format_table", "generate_responses",
           "load_adapted_model", "resolve_adapter_dir", "run_evaluate",
           "score_multiple_choice"]
