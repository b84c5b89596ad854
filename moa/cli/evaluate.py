"""`moa evaluate`: accuracy of a model, with or without a MoA adapter, on a data file.

Multiple choice (moa/cli/data.py's formats): every choice is scored by the sum of its tokens'
log-probabilities after the prompt, the prompt run once per record (a KV cache shared by
its choices, passed under the name the model's forward takes: cache_keyword), records
batched by prompt length; the prediction is the best choice ("accuracy"), and the best
choice after dividing by its length in characters ("accuracy_norm", as LM evaluation
harnesses do). Arithmetic: greedy generation from the
prompt in batches padded on the left (generate gives the positions that skip the padding);
the response is cut at the end-of-text token or where a new prompt begins, and its last
number must equal the answer within 1e-3, as the published evaluation checks.

A record whose scores are not all finite (a NaN or infinite log-likelihood; in
generation, a NaN or +inf logit) is never a right answer: it counts as wrong, and as
"non_finite" per task and over all, with a warning line.

Output: a table on stdout and a JSON file (strict JSON: no NaN or Infinity, null where a
number is not finite) whose top level has "accuracy" (over every record; multiple choice
counts its unnormalised prediction), "records", "non_finite", per task "accuracy" (and
"accuracy_norm") and "non_finite", and per record the prediction. --out is checked before
anything is loaded: never one of the inputs, never an existing file without --overwrite,
in a folder that can be written; the file is written whole or not at all (a temporary file
renamed onto it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import secrets
import stat
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moa.cli.data import (
    ArithmeticItem,
    MultipleChoiceItem,
    extract_number,
    load_evaluation_items,
    longest_token_chars,
    split_context,
    tokenize_head,
    tokenize_tail,
)
from moa.cli.options import (
    Option,
    backend,
    count,
    device,
    flag,
    merge_options,
    options_dataclass,
    positive_int,
    resolve_device,
    text,
)
from moa.cli.outputs import check_links_lead_somewhere
from moa.config import BACKENDS
from moa.distributed import World, join_world

# Where a response stops: the start of a new prompt of moa/cli/data.py's templates.
STOP_TEXTS = ("\nQuestion:", "### Instruction", "### Input", "### Response")
TOLERANCE = 1e-3


EVALUATE_OPTIONS: tuple[Option, ...] = (
    Option("model", text, None, "a local transformers checkpoint directory or a .gguf file; "
           "none: the embedded text model", "PATH"),
    Option("adapter", text, None, "a MoA adapter directory (what save_pretrained wrote, e.g. "
           "moa train's OUT/adapter); none: the base model alone", "DIR"),
    Option("data", text, None, "evaluation records, JSON or JSONL (required)", "FILE"),
    Option("out", text, "moa-eval.json", "the results as JSON (never one of the inputs)",
           "RESULTS.json"),
    Option("overwrite", flag, False, "replace --out when it exists (without it, an existing "
           "--out is refused before anything is loaded)"),
    Option("backend", backend, None, "run the adapter's MoA layers with this backend "
           f"({', '.join(BACKENDS)}) instead of the one it was saved with (e.g. torch on a "
           "machine without a GPU for an adapter saved with triton); none: the saved one",
           "NAME"),
    Option("batch_size", positive_int, 16, "records (prompts) per forward pass", "B"),
    Option("max_new_tokens", positive_int, 128, "tokens generated at most per arithmetic "
           "answer", "N"),
    Option("max_length", positive_int, 1024, "tokens per scored sequence at most (the "
           "prompt's start is cut first)", "N"),
    Option("limit", count, None, "evaluate the first N records only", "N"),
    Option("device", device, "auto", "auto (a CUDA GPU when there is one), cpu, cuda or "
           "cuda:N"),
)


@options_dataclass(EVALUATE_OPTIONS, config=None)
class EvaluateOptions:
    """What `moa evaluate` runs with: a keyword field per EVALUATE_OPTIONS entry (its name
    and default), and config, the --config file they came from (if any)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluateOptions:
        """The options of parsed `moa evaluate` flags (with their --config file)."""
        options = cls(**merge_options(args, EVALUATE_OPTIONS),
                      config=getattr(args, "config", None))
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
    non_finite: int = 0  # records whose scores were not all finite (counted as wrong)


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


def _context_tokens(tokenizer, text_: str, room: int, most: int, longest: int) -> list[int]:
    """The context's tokens (with the tokenizer's special start tokens) within `room`, as
    _fit cuts the whole text's tokens, tokenising only the pieces kept; `most` is the most
    tokens any context of the call may keep."""
    head = tokenize_head(tokenizer, text_, most + 1, True, longest) or \
        [tokenizer.eos_token_id]
    if len(head) <= most:  # the whole context
        return _fit(head, _leading_specials(tokenizer, head), room)
    keep = _leading_specials(tokenizer, head)
    return head[:keep] + tokenize_tail(tokenizer, text_, room - keep, True, longest)


def _accepts(model, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


def cache_keyword(model) -> str:
    """The name under which the model's forward takes a KV cache and its output returns
    one: "cache" where the forward has that parameter (transformers 5.25 renamed it, and
    warns that "past_key_values" goes in 5.40), else "past_key_values"."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _first_difference(first: list[int], second: list[int]) -> int | None:
    """Where two token lists first differ (the shorter one's length when it is the other's
    start); None when they are equal."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return None if len(first) == len(second) else min(len(first), len(second))


def _refuse_ties(tokenizer, item: MultipleChoiceItem, where: str, tokens: list[list[int]],
                 max_length: int, longest: int) -> None:
    """ValueError when two of an item's choices are the same tokens: the same text for the
    tokenizer (an uncased vocabulary), or the same start cut by max_length; their scores
    would tie and the first would win. Names the --max-length that tells every pair of the
    item's choices apart."""
    seen: dict[tuple[int, ...], int] = {}
    tied = next(((seen[key], index) for index, key in enumerate(map(tuple, tokens))
                 if seen.setdefault(key, index) != index), None)
    if tied is None:
        return
    texts = [split_context(item.context, c)[1] for c in item.continuations]
    differences, size = {}, len(tokens[tied[0]])
    while len(differences) < len(texts) * (len(texts) - 1) // 2:
        size *= 2  # every choice's first tokens, twice as many each time
        heads = [tokenize_head(tokenizer, t, size, longest=longest) for t in texts]
        for a in range(len(heads)):
            for b in range(a + 1, len(heads)):
                differ = _first_difference(heads[a], heads[b])
                if differ is not None:
                    differences[a, b] = differ
                elif len(heads[a]) < size:  # the whole choices: the same tokens
                    raise ValueError(
                        f"{where}: choices {a} and {b} (from 0), {item.continuations[a][:40]!r} "
                        f"and {item.continuations[b][:40]!r}, are the same tokens for this "
                        "tokenizer, so their scores would tie; make them differ")
    raise ValueError(f"{where}: choices {tied[0]} and {tied[1]} (from 0) begin with the same "
                     f"{len(tokens[tied[0]])} tokens, all that --max-length {max_length} keeps "
                     "of a choice (half of it), so their scores would tie; give --max-length "
                     f"{2 * (max(differences.values()) + 1)} or more")


def longest_first(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of indices into `sequences`, longest first (the padding stays small and a
    batch that runs out of memory does so at once)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, longest] padded on the left with `pad_id`, and their attention mask."""
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, longest - len(sequence):] = torch.tensor(sequence)
        mask[row, longest - len(sequence):] = 1
    return ids, mask


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
    A choice keeps at most max_length // 2 tokens, its context the rest (its start goes
    first); only those pieces of a long text are tokenised. ValueError when two choices of
    an item are the same tokens, whole or within that cut (their scores would tie).
    """
    from tqdm import tqdm

    longest = longest_token_chars(tokenizer)
    per_choice = max(1, max_length // 2)
    contexts, continuations = [], []
    for number, item in enumerate(items, 1):
        context_text, _ = split_context(item.context, "")
        tokens = []
        for continuation in item.continuations:
            ids = tokenize_head(tokenizer, split_context(item.context, continuation)[1],
                                per_choice, longest=longest)
            if not ids:
                raise ValueError(f"choice {continuation!r} tokenizes to nothing")
            tokens.append(ids)
        _refuse_ties(tokenizer, item, item.where or f"item {number}", tokens, max_length,
                     longest)
        room = max(1, max_length - max(len(t) for t in tokens))
        contexts.append(_context_tokens(tokenizer, context_text, room, max_length, longest))
        continuations.append(tokens)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_name = cache_keyword(model)
    scores = [[0.0] * len(item.continuations) for item in items]
    for batch in tqdm(longest_first(contexts, batch_size), desc="scoring choices",
                      unit="batch", disable=not progress, mininterval=0.5):
        ids, mask = left_padded([contexts[i] for i in batch], tokenizer.pad_token_id)
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
        cache = getattr(output, cache_name)
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
                       position_ids=tail_positions.to(device), use_cache=True,
                       **{cache_name: cache}).logits
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


def _non_finite_rows(rows: int):
    """A transformers LogitsProcessor that leaves the scores as they are and marks in
    `.seen` [rows] bool the batch rows whose next-token scores held a NaN or +inf at some
    step (-inf is how generation rules out a token). Greedy decoding of NaN logits picks a
    token all the same; its answer must not count."""
    from transformers import LogitsProcessor

    class NonFiniteRows(LogitsProcessor):
        def __init__(self) -> None:
            self.seen = torch.zeros(rows, dtype=torch.bool)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            bad = scores.isnan().any(-1) | scores.isposinf().any(-1)
            self.seen = self.seen.to(bad.device) | bad
            return scores

    return NonFiniteRows()


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int,
                       max_new_tokens: int, max_length: int, device: torch.device,
                       progress: bool = True) -> tuple[list[str], list[bool]]:
    """Greedy responses to `prompts` (special tokens dropped, cut by cut_response), and per
    prompt whether a NaN or +inf logit came up while generating it. A prompt keeps its last
    max_length - max_new_tokens tokens (at least 1); only that piece of it is tokenised."""
    from tqdm import tqdm
    from transformers import LogitsProcessorList

    longest = longest_token_chars(tokenizer)
    room = max(1, max_length - max_new_tokens)
    encoded = [tokenize_tail(tokenizer, p, room, True, longest) for p in prompts]
    responses = [""] * len(prompts)
    non_finite = [False] * len(prompts)
    for batch in tqdm(longest_first(encoded, batch_size), desc="generating", unit="batch",
                      disable=not progress, mininterval=0.5):
        ids, mask = left_padded([encoded[i] for i in batch], tokenizer.pad_token_id)
        watch = _non_finite_rows(len(batch))
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                logits_processor=LogitsProcessorList([watch]))
        seen = watch.seen.tolist()
        for row, i in enumerate(batch):
            text_ = tokenizer.decode(output[row, ids.shape[1]:], skip_special_tokens=True)
            responses[i] = cut_response(text_)
            non_finite[i] = bool(seen[row])
    return responses, non_finite


def _finite_or_none(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def evaluate_items(model, tokenizer, items: list, batch_size: int = 16,
                   max_new_tokens: int = 128, max_length: int = 1024,
                   device: torch.device | str = "cpu", progress: bool = True,
                   world: World | None = None) -> dict:
    """Accuracy of `model` on evaluation items (moa/cli/data.py); the dict of
    EvaluationResult's fields but the time and the files. A record whose scores are not all
    finite counts as wrong, with no prediction, and in "non_finite".

    world: the processes of a launched group (moa/distributed.py), every one of which calls
    this with the same items: each scores every world.size-th item (its own model, on its
    own device), the predictions are gathered, and every process returns the scores of all
    the items, as one process scoring them all would (an error on any process is raised on
    all). None: one process scores them all."""
    world = world or World()
    numbered = [(i, item if item.where else replace(item, where=f"item {i + 1}"))
                for i, item in enumerate(items)]
    mine = numbered[world.rank::world.size]
    found = world.agree(lambda: _predict(model, tokenizer, mine, batch_size,
                                         max_new_tokens, max_length, torch.device(device),
                                         progress and world.is_main))
    predictions: list[dict] = [{} for _ in items]
    for i, prediction in world.gather(found):
        predictions[i] = prediction
    tasks = {}
    for task in ("multiple_choice", "arithmetic"):
        rows = [p for p in predictions if p["task"] == task]
        if not rows:
            continue
        tasks[task] = {"records": len(rows),
                       "accuracy": sum(p["correct"] for p in rows) / len(rows)}
        if task == "multiple_choice":
            tasks[task]["accuracy_norm"] = sum(
                p["prediction_norm"] == p["answer"] for p in rows if not p["non_finite"]
            ) / len(rows)
        tasks[task]["non_finite"] = sum(p["non_finite"] for p in rows)
    total = sum(p["correct"] for p in predictions)
    return {"accuracy": total / len(items), "records": len(items), "tasks": tasks,
            "predictions": predictions,
            "non_finite": sum(task["non_finite"] for task in tasks.values())}


def _predict(model, tokenizer, numbered: list, batch_size: int, max_new_tokens: int,
             max_length: int, device: torch.device, progress: bool) -> list[tuple[int, dict]]:
    """(index, prediction) of each (index, item) in `numbered` (see evaluate_items)."""
    choice_items = [(i, item) for i, item in numbered if isinstance(item, MultipleChoiceItem)]
    arithmetic_items = [(i, item) for i, item in numbered if isinstance(item, ArithmeticItem)]
    predictions = []
    if choice_items:
        scores = score_multiple_choice(model, tokenizer, [item for _, item in choice_items],
                                       batch_size, max_length, device, progress)
        for (i, item), score in zip(choice_items, scores):
            prediction = {"record": i + 1, "task": "multiple_choice", "answer": item.answer,
                          "prediction": None, "prediction_norm": None, "correct": False,
                          "non_finite": True,
                          "log_likelihoods": [_finite_or_none(s) for s in score]}
            predictions.append((i, prediction))
            if not all(math.isfinite(s) for s in score):
                continue
            best = max(range(len(score)), key=score.__getitem__)
            normalised = [s / len(c) for s, c in zip(score, item.continuations)]
            best_norm = max(range(len(score)), key=normalised.__getitem__)
            prediction.update(prediction=best, prediction_norm=best_norm,
                              correct=best == item.answer, non_finite=False)
    if arithmetic_items:
        responses, flags = generate_responses(
            model, tokenizer, [item.prompt for _, item in arithmetic_items], batch_size,
            max_new_tokens, max_length, device, progress)
        for (i, item), response, flagged in zip(arithmetic_items, responses, flags):
            number = None if flagged else extract_number(response)
            right = number is not None and abs(number - item.answer) <= TOLERANCE
            predictions.append((i, {"record": i + 1, "task": "arithmetic",
                                    "answer": item.answer, "prediction": number,
                                    "correct": right, "non_finite": flagged,
                                    "response": response}))
    return predictions


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


def load_adapted_model(model_path: str | None, adapter: str | None, log=print,
                       backend: str | None = None):
    """The base model at model_path with the adapter (if any) loaded for inference, its
    MoA layers on `backend` (None: the one saved with it); a ValueError naming both when
    the adapter was trained on a base it does not fit. Nothing in it requires grad, so a
    forward outside no_grad builds no graph."""
    from moa.cli.loading import load_base_model, model_description
    from moa.model import MoAModel

    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    base = load_base_model(model_path).requires_grad_(False)
    if adapter_dir is None:
        return base
    recorded = trained_on(adapter_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = MoAModel.from_pretrained(base, adapter_dir, is_trainable=False,
                                             backend=backend)
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


def check_backend(adapter_dir: Path | None, chosen: str | None, device: torch.device,
                  log: Callable[[str], None] = print) -> None:
    """Before the model loads: a ValueError naming --backend where the backend the adapter
    would run on (`chosen`, else the one saved with it) cannot run on `device` (triton
    without CUDA or the Triton interpreter); a warning line for --backend without an
    adapter (the base model has no MoA layers)."""
    from moa.config import MoAConfig
    from moa.modules.dispatch import resolve_backend
    from moa_kernels.contract import backend_info

    if adapter_dir is None:
        if chosen is not None:
            log(f"warning: --backend {chosen} has no effect without --adapter (the base model "
                "has no MoA layers)")
        return
    saved = MoAConfig.from_pretrained(adapter_dir).backend
    if backend_info(resolve_backend(chosen or saved, device)).runs_on(device):
        return
    if chosen is None:
        raise ValueError(f"the adapter in {str(adapter_dir)!r} was saved with backend "
                         f"{saved!r}, which runs triton kernels: a CUDA GPU (or "
                         f"TRITON_INTERPRET=1) is needed, and this run is on {device.type}; "
                         "give --backend torch (or auto) to evaluate it here")
    raise ValueError(f"--backend {chosen} runs triton kernels: a CUDA GPU (or "
                     f"TRITON_INTERPRET=1) is needed, and this run is on {device.type}; give "
                     "--backend torch (or auto)")


def _protected_inputs(options: EvaluateOptions, adapter_dir: Path | None) -> dict[str, Path]:
    """What `moa evaluate` reads, by how the user named it: --out must be none of them."""
    from moa.config import CONFIG_NAME
    from moa.serialization import WEIGHTS_NAME

    inputs = {"--data": Path(options.data)}
    if options.config is not None:
        inputs["--config"] = Path(options.config)
    if adapter_dir is not None:
        inputs["the adapter's config"] = adapter_dir / CONFIG_NAME
        inputs["the adapter's weights"] = adapter_dir / WEIGHTS_NAME
    if options.model is not None:
        inputs["--model"] = Path(options.model)
    return inputs


def check_output_file(out: Path, inputs: dict[str, Path], overwrite: bool) -> Path:
    """The file to write `out`'s results to: out with its links and ".." resolved (as the
    folders still to be made will be: "new/../d.jsonl" is "d.jsonl"). Refuses, before
    anything is loaded, an --out that results cannot or must not be written to: a directory
    or something else that is not a regular file; the same file as one of `inputs` (by any
    name or link: a data set, a config, an adapter's files, a model file or a file in a
    model directory), even with `overwrite`; an existing file without `overwrite`; a folder
    that cannot be written (probed: a file created there and removed); a link on the way
    that leads nowhere (check_links_lead_somewhere)."""
    check_links_lead_somewhere(out)
    real = Path(os.path.realpath(out))
    if real.is_dir():
        raise IsADirectoryError(f"--out {str(out)!r} is a directory; name a JSON file")
    for folder in real.parents:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot write {out}: {folder} is a file")
    if real.exists():
        if not stat.S_ISREG(real.stat().st_mode):
            raise ValueError(f"--out {str(out)!r} is not a regular file; name a JSON file")
        for name, path in inputs.items():
            inside = path.is_dir() and os.path.samefile(real.parent, path)
            if inside or (path.exists() and os.path.samefile(real, path)):
                what = f"a file in {name} {str(path)!r}" if inside else \
                    f"{name} {str(path)!r}"
                raise ValueError(f"--out {str(out)!r} is {what}: the results would destroy "
                                 "an input; name another file")
        if not overwrite:
            raise FileExistsError(f"--out {str(out)!r} already exists (another run's "
                                  "results?); give --overwrite to replace it, or another "
                                  "--out")
    folder = real.parent
    while not folder.exists():  # the folders still to be made go into the nearest one
        folder = folder.parent
    probe = folder / f".moa-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"cannot write --out {str(out)!r}: no file can be created in "
                      f"{str(folder)!r} ({error.strerror or error})") from None
    return real


def _json_safe(value):
    """value with every float that is not finite turned into None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_results(out: Path, payload: dict, overwrite: bool) -> None:
    """payload as strict JSON (null where a number is not finite: never a bare NaN) into
    `out`, whole or not at all: written to a temporary file beside it, then renamed onto it.
    Without `overwrite` an `out` that appeared meanwhile is left alone, and the error names
    the temporary file that holds the results."""
    text_ = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text_)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if overwrite:
        os.replace(temporary, out)
        return
    try:
        os.link(temporary, out)  # fails, where rename would not, when out exists
    except FileExistsError:
        raise FileExistsError(f"--out {str(out)!r} appeared while this run was scoring; "
                              f"its results are in {str(temporary)!r}") from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise FileExistsError(f"--out {str(out)!r} appeared while this run was "
                                  f"scoring; its results are in {str(temporary)!r}") from None
        os.replace(temporary, out)
        return
    temporary.unlink()


def format_table(tasks: dict[str, dict], accuracy: float, records: int) -> str:
    """The results as a text table: per task records, accuracy, length-normalised, and the
    records whose scores were not finite (counted as wrong)."""
    lines = [f"{'task':16s} {'records':>8s} {'accuracy':>9s} {'length-normalised':>18s} "
             f"{'non-finite':>10s}"]
    for name, task in tasks.items():
        norm = f"{task['accuracy_norm']:.4f}" if "accuracy_norm" in task else "-"
        lines.append(f"{name.replace('_', ' '):16s} {task['records']:8d} "
                     f"{task['accuracy']:9.4f} {norm:>18s} {task.get('non_finite', 0):10d}")
    if len(tasks) > 1:
        non_finite = sum(task.get("non_finite", 0) for task in tasks.values())
        lines.append(f"{'all':16s} {records:8d} {accuracy:9.4f} {'-':>18s} {non_finite:10d}")
    return "\n".join(lines)


def run_evaluate(options: EvaluateOptions, log: Callable[[str], None] = print,
                 progress: bool = True) -> EvaluationResult:
    """`moa evaluate` (see the module docstring). Before any model is loaded: --out
    (check_output_file), the data (bad records fail here) and the backend; then the model,
    the adapter and the tokenizer. The table is printed before the results are written.

    Launched as several processes (moa/distributed.py): each scores its share of the
    records (evaluate_items) on its own device (with --device auto or cuda, the GPU of its
    local rank), rank 0 alone checks and writes --out and prints, an error on any process
    is raised on all, and every process returns the same result (files only on rank 0)."""
    from moa.cli.loading import load_tokenizer, model_description

    started = time.perf_counter()
    out = Path(options.out)
    world = join_world(cpu=resolve_device(options.device).type == "cpu")
    say = log if world.is_main else _quiet
    target = world.device(options.device)

    def checks():
        adapter_dir = resolve_adapter_dir(options.adapter) if options.adapter else None
        destination = check_output_file(out, _protected_inputs(options, adapter_dir),
                                        options.overwrite) if world.is_main else None
        items = load_evaluation_items(options.data, warn=lambda line: say(f"warning: {line}"))
        if options.limit is not None:
            items = items[:options.limit]
        if not items:
            raise ValueError(f"{options.data}: no usable record (--limit {options.limit})")
        check_backend(adapter_dir, options.backend, target, say)
        return destination, items

    destination, items = world.agree(checks)
    tokenizer, model = world.agree(lambda: (
        load_tokenizer(options.model),
        load_adapted_model(options.model, options.adapter, say, options.backend)))
    model.to(target).eval()
    say(f"model {model_description(options.model)}"
        + (f" with the adapter {options.adapter}" if options.adapter else " (no adapter)")
        + f"; data {options.data}: {len(items)} records"
        + (f", {world.size} processes scoring a share each" if world.size > 1 else ""))
    results = evaluate_items(model, tokenizer, items, options.batch_size,
                             options.max_new_tokens, options.max_length, target, progress,
                             world=world)
    result = EvaluationResult(results["accuracy"], results["records"], results["tasks"],
                              results["predictions"], time.perf_counter() - started,
                              non_finite=results["non_finite"])
    payload = {"accuracy": result.accuracy, "records": result.records,
               "non_finite": result.non_finite, "model": model_description(options.model),
               "adapter": options.adapter, "backend": options.backend, "data": options.data,
               "tasks": result.tasks, "seconds": result.seconds,
               "predictions": result.predictions}
    say(format_table(result.tasks, result.accuracy, result.records))
    if result.non_finite:
        say(f"warning: {result.non_finite} of {result.records} records had scores that are "
            "not finite (NaN or infinite log-likelihoods or logits): counted as wrong, "
            "'non_finite' in the results; the model or the adapter computes NaN or inf")

    def write() -> None:
        if world.is_main:
            write_results(destination, payload, options.overwrite)

    world.agree(write)  # the other processes return once rank 0 has written
    if world.is_main:
        result.files.append(out)
    say(f"results written to {out} ({result.seconds:.1f} s)")
    return result


def _quiet(_: str) -> None:
    """What the processes other than rank 0 print: nothing."""


__all__ = ["EVALUATE_OPTIONS", "EvaluateOptions", "EvaluationResult", "cache_keyword",
           "check_backend", "check_output_file", "cut_response", "evaluate_items",
           "format_table", "generate_responses", "load_adapted_model", "resolve_adapter_dir",
           "run_evaluate", "score_multiple_choice", "write_results"]
