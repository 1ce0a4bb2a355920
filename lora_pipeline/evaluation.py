"""One evaluation function for the base model and the candidate: same prompts, same decoding, same scoring."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.formatting import IGNORE_INDEX, encode_generation_prompt, prompt_turns, tokenize_conversation
from lora_pipeline.suites import EvalSuites  # noqa: F401 (also importable from here)

#: n-gram size of the repetition rate (a degenerate generation repeats phrases, not single words).
REPETITION_NGRAM = 3


def normalize_answer(text: str, match: str = "exact") -> str:
    """The form answers are compared in.

    ``exact``: whitespace collapsed and ends stripped. ``normalized`` (for free-form answers, as SQuAD
    scores them): also lower-cased, punctuation and the articles a/an/the removed.
    """
    if match == "normalized":
        text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens (bag of words overlap); 1.0 when both are empty."""
    predicted, expected = prediction.split(), reference.split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def repetition_rate(token_ids: Sequence[int], n: int = REPETITION_NGRAM) -> float:
    """Fraction of a generation's n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    ngrams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not ngrams:
        return 0.0
    return 1 - len(set(ngrams)) / len(ngrams)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), Google's ``rouge-score`` implementation."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@dataclass(frozen=True)
class Generation:
    """One greedy answer: its text, whether it stopped at EOS, and its repetition rate."""

    text: str
    stopped: bool
    repetition: float


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, conversations: Sequence[dict[str, Any]], max_new_tokens: int, batch_size: int,
    stop_ids: Sequence[int],
) -> list[Generation]:
    """Greedy answers to each conversation's prompt turns; ``stopped`` when a stop id ended the answer.

    Generation stops at every id of ``stop_ids`` (EOS, the end-of-turn token, every
    ``generation_config.eos_token_id``), as serving does.
    """
    device = next(model.parameters()).device
    stops = set(stop_ids)
    results: list[Generation] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [encode_generation_prompt(tokenizer, prompt_turns(row["messages"])) for row in batch]
        padded = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        output = model.generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=tokenizer.pad_token_id,
        )
        for new_tokens in output[:, padded["input_ids"].shape[1] :].tolist():
            stop_at = next((i for i, token in enumerate(new_tokens) if token in stops), None)
            answer = new_tokens if stop_at is None else new_tokens[:stop_at]
            while answer and answer[-1] == tokenizer.pad_token_id:  # batch padding, not generated text
                answer.pop()
            results.append(Generation(tokenizer.decode(answer, skip_special_tokens=True).strip(), stop_at is not None,
                                      repetition_rate(answer)))
    return results


def score_generation_suite(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], max_new_tokens: int, batch_size: int,
    stop_ids: Sequence[int], records: list[dict[str, Any]] | None = None, match: str = "exact",
    answers: Sequence[Generation] | None = None,
) -> dict[str, float]:
    """Answer quality and generation health against each row's final assistant turn.

    Returns:
        ``exact_match`` (compared as ``match`` says, see :func:`normalize_answer`), ``token_f1``,
        ``rouge_l`` (means over rows), ``stop_rate`` (fraction that ended with a stop token within the
        budget), ``repetition_rate`` (mean repeated-n-gram fraction), ``n``.

    Args:
        records: if given, receives one dict per row (prompt, expected, answer, stopped, correct), so
            a person can see *what* the model answered, not only how often it was right.
        answers: the model's answers when already generated (else generated here).
    """
    if not rows:
        return {}
    if answers is None:
        answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size, stop_ids)
    totals: Counter[str] = Counter()
    for answer, row in zip(answers, rows, strict=True):
        expected = row["messages"][-1]["content"]
        correct = normalize_answer(answer.text, match) == normalize_answer(expected, match)
        totals["exact_match"] += correct
        totals["token_f1"] += token_f1(answer.text, expected)
        totals["rouge_l"] += rouge_l(answer.text, expected)
        totals["stop_rate"] += answer.stopped
        totals["repetition_rate"] += answer.repetition
        if records is not None:
            records.append({"prompt": row["messages"][:-1], "expected": expected, "answer": answer.text,
                            "stopped": answer.stopped, "correct": correct})
    scores = {key: value / len(rows) for key, value in totals.items()}
    return {**{key: scores.get(key, 0.0) for key in
               ("exact_match", "token_f1", "rouge_l", "stop_rate", "repetition_rate")}, "n": len(rows)}


@torch.no_grad()
def _labelled_perplexity(model: Any, samples: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                         batch_size: int) -> float:
    """exp(mean NLL) of every labelled next token over ``(input_ids, labels)`` samples.

    Batches are right-padded, so every sample keeps positions 0..n-1 as in training.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, sample_labels) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(sample_labels)] = torch.tensor(sample_labels)
            attention[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        total_nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="sum").item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> float:
    """Token-level perplexity of ``texts`` (mean negative log-likelihood over every predicted token)."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    return _labelled_perplexity(model, [(ids, ids) for ids in encoded], tokenizer.pad_token_id, batch_size)


def answer_perplexity(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int,
                      max_length: int, stop_ids: Sequence[int]) -> float:
    """Perplexity of the reference answers given their prompts (assistant tokens and their stop token only)."""
    samples = [tokenize_conversation(tokenizer, row["messages"], max_length, stop_ids) for row in rows]
    return _labelled_perplexity(model, [(s.input_ids, s.labels) for s in samples], tokenizer.pad_token_id,
                                batch_size)


def run_lm_eval_task(model: Any, tokenizer: Any, task: str, batch_size: int,
                     limit: int | None) -> tuple[dict[str, float], str | None]:
    """One lm-evaluation-harness task on the in-memory model: ``(metrics, None)`` or ``({}, why skipped)``.

    Optional: skipped with a message when the package is not installed or the task's data cannot be
    loaded (offline, no cached dataset). Metric names are ``lm_eval_<task>_<metric>`` (e.g. ``acc``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {}, (f"lm_eval:{task} skipped: lm-evaluation-harness is not installed "
                    "(pip install 'lora-pipeline[lm-eval]')")
    try:
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                  tasks=[task], limit=limit)
    except Exception as exc:  # noqa: BLE001 - an optional suite must not fail the run (e.g. no data offline)
        return {}, f"lm_eval:{task} skipped: {type(exc).__name__}: {exc}"
    metrics = {}
    for name, value in results["results"].get(task, {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"lm_eval_{task}_{name.split(',')[0]}"] = float(value)  # "acc,none" -> "acc"
    return metrics, None


def evaluate_model(
    model: Any, tokenizer: Any, suites: EvalSuites, *, max_new_tokens: int, batch_size: int, max_length: int,
    stop_ids: Sequence[int], match: str = "exact", regression_answers: Sequence[Generation] | None = None,
    generations_path: Path | None = None, skipped: list[str] | None = None,
) -> dict[str, float]:
    """Score one model on every suite; flat metric names (``task_exact_match``, ...).

    Args:
        stop_ids: the model's stop set; generation stops at any of them.
        match: how exact match compares answers (:func:`normalize_answer`).
        regression_answers: this model's answers to the regression prompts when already generated
            (the base, whose answers are the references with ``eval.regression_qa_path: base_answers``).
        generations_path: if given, every generated answer is written there as JSONL (with its suite).
        skipped: if given, receives one message per optional suite that could not run.
    """
    metrics: dict[str, float] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    task_rows = suites.task if suites.score_task else []
    for name, rows, answers in (("task", task_rows, None), ("regression", suites.regression_qa, regression_answers)):
        records[name] = []
        scores = score_generation_suite(model, tokenizer, rows, max_new_tokens, batch_size, stop_ids, records[name],
                                        match, answers)
        for key, value in scores.items():
            metrics[f"{name}_{key}"] = value
    if task_rows:
        metrics["task_perplexity"] = answer_perplexity(model, tokenizer, task_rows, batch_size, max_length, stop_ids)
    if suites.task_text and suites.score_task:
        metrics["task_perplexity"] = perplexity(model, tokenizer, suites.task_text, batch_size, max_length)
    if suites.regression_text:
        metrics["regression_perplexity"] = perplexity(model, tokenizer, suites.regression_text, batch_size, max_length)
    for task in suites.lm_eval_tasks:
        task_metrics, reason = run_lm_eval_task(model, tokenizer, task, batch_size, suites.lm_eval_limit)
        metrics.update(task_metrics)
        if reason is not None and skipped is not None:
            skipped.append(reason)
    if generations_path is not None:
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        with generations_path.open("w", encoding="utf-8") as handle:
            for suite, suite_records in records.items():
                for record in suite_records:
                    handle.write(json.dumps({"suite": suite, **record}, ensure_ascii=False) + "\n")
    return metrics


def write_metrics(metrics: dict[str, float], path: Path) -> Path:
    """Save a metric dict as JSON (the artefact the flow and MLflow keep)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


#: Metrics on a 0-1 scale, drawn as grouped bars (perplexities get their own log-scale panel).
_CHART_RATES = ("task_exact_match", "task_token_f1", "task_rouge_l", "task_stop_rate", "task_repetition_rate",
                "regression_exact_match", "regression_stop_rate")
_CHART_PERPLEXITIES = ("task_perplexity", "regression_perplexity")


def comparison_table(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {model label: value}}`` over every metric any model has (base, candidate, champion)."""
    metrics = sorted({key for scores in results.values() for key in scores})
    return {key: {label: scores[key] for label, scores in results.items() if key in scores} for key in metrics}


def write_comparison_chart(results: dict[str, dict[str, float]], path: Path) -> Path:
    """PNG bar chart of base vs candidate (vs champion): rates on the left, perplexities on the right."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, (rates_axis, ppl_axis) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for axis, keys in ((rates_axis, _CHART_RATES), (ppl_axis, _CHART_PERPLEXITIES)):
        keys = [key for key in keys if any(key in scores for scores in results.values())]
        width = 0.8 / max(len(labels), 1)
        for offset, label in enumerate(labels):
            values = [results[label].get(key, float("nan")) for key in keys]
            axis.bar([i + offset * width for i in range(len(keys))], values, width, label=label)
        axis.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(keys))])
        axis.set_xticklabels([key.replace("_", "\n", 1) for key in keys], fontsize=8)
    rates_axis.set_ylim(0, 1.05)
    rates_axis.set_title("quality and generation health (higher is better, except repetition)")
    ppl_axis.set_yscale("log")
    ppl_axis.set_title("perplexity (lower is better)")
    rates_axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
