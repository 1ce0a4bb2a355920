"""One evaluation function for the base model and the candidate: same prompts, same decoding, same scoring."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.formatting import encode_generation_prompt, prompt_turns


@dataclass(frozen=True)
class EvalSuites:
    """Held-out rows to score: the task, the base model's own skills, and general text."""

    task: list[dict[str, Any]]
    regression_qa: list[dict[str, Any]]
    regression_text: list[str]


def normalize_answer(text: str) -> str:
    """Exact match compares answers with whitespace collapsed and ends stripped."""
    return " ".join(text.split())


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, conversations: Sequence[dict[str, Any]], max_new_tokens: int, batch_size: int
) -> list[tuple[str, bool]]:
    """Greedy answers to each conversation's prompt turns, with whether generation stopped at EOS."""
    device = next(model.parameters()).device
    results: list[tuple[str, bool]] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [encode_generation_prompt(tokenizer, prompt_turns(row["messages"])) for row in batch]
        padded = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        output = model.generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for new_tokens in output[:, padded["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in new_tokens
            answer = new_tokens[: new_tokens.index(tokenizer.eos_token_id)] if stopped else new_tokens
            results.append((tokenizer.decode(answer, skip_special_tokens=True), stopped))
    return results


def score_generation_suite(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], max_new_tokens: int, batch_size: int,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Exact match against each row's final assistant turn, and the fraction that stopped at EOS.

    Args:
        records: if given, receives one dict per row (prompt, expected, answer, stopped, correct), so
            a person can see *what* the model answered, not only how often it was right.
    """
    if not rows:
        return {}
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    hits = 0
    for (text, stopped), row in zip(answers, rows, strict=True):
        expected = row["messages"][-1]["content"]
        correct = normalize_answer(text) == normalize_answer(expected)
        hits += correct
        if records is not None:
            records.append({"prompt": row["messages"][:-1], "expected": expected, "answer": text,
                            "stopped": stopped, "correct": correct})
    return {"exact_match": hits / len(rows), "stop_rate": sum(s for _, s in answers) / len(rows), "n": len(rows)}


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> float:
    """Token-level perplexity of ``texts`` (mean negative log-likelihood over every predicted token)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[start : start + batch_size]]
        batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(device)
        attention = batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        targets = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def evaluate_model(
    model: Any, tokenizer: Any, suites: EvalSuites, *, max_new_tokens: int, batch_size: int, max_length: int,
    generations_path: Path | None = None,
) -> dict[str, float]:
    """Score one model on every suite; flat metric names (``task_exact_match``, ...).

    Args:
        generations_path: if given, every generated answer is written there as JSONL (with its suite).
    """
    metrics: dict[str, float] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for name, rows in (("task", suites.task), ("regression", suites.regression_qa)):
        records[name] = []
        scores = score_generation_suite(model, tokenizer, rows, max_new_tokens, batch_size, records[name])
        for key, value in scores.items():
            metrics[f"{name}_{key}"] = value
    if suites.regression_text:
        metrics["regression_perplexity"] = perplexity(model, tokenizer, suites.regression_text, batch_size, max_length)
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
