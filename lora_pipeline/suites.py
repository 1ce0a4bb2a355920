"""The evaluation suites of one run: held-out task rows, the regression Q/A and general text.

Where each comes from is decided by the config after :func:`lora_pipeline.stages.resolve_assets`:

- task rows: ``data.eval_path``, or the data stage's held-out split of ``data.path``
  (``<run dir>/data/eval.jsonl``, already normalised) when it is unset;
- regression Q/A: a file, or ``base_answers``: the package's general prompts, answered greedily by
  the (quantised) base model; those answers, written to ``<run dir>/eval/regression_references.jsonl``
  when the base is scored, are the references every other model is compared with;
- regression text: a file (the package ships a general one, :data:`GENERAL_TEXT`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_pipeline.config import BASE_ANSWERS, PipelineConfig
from lora_pipeline.data import read_messages
from lora_pipeline.data.writer import EVAL_FILENAME
from lora_pipeline.formatting import encode_generation_prompt, prompt_turns

if TYPE_CHECKING:  # reading the suites (and keying a stage by them) needs no torch
    from lora_pipeline.evaluation import Generation

RESOURCES = Path(__file__).parent / "resources"
#: General prompts whose base-model answers become the regression references (``base_answers``). Each asks
#: for one short sentence: a reference that ends in a stop token within ``eval.max_new_tokens`` compares
#: whole answers (SmolLM2-135M-Instruct stops on 40 of 40 this way, on about half without it).
GENERAL_PROMPTS = RESOURCES / "general_prompts.jsonl"
#: General text for regression perplexity when the user names none.
GENERAL_TEXT = RESOURCES / "general_text.jsonl"
REFERENCES_FILENAME = "regression_references.jsonl"


@dataclass(frozen=True)
class EvalSuites:
    """Held-out rows to score: the task, the base model's own skills, and general text."""

    task: list[dict[str, Any]]
    regression_qa: list[dict[str, Any]]
    regression_text: list[str]
    task_text: list[str] = field(default_factory=list)  # data.format=text: held-out texts (perplexity)
    lm_eval_tasks: tuple[str, ...] = ()  # lm-evaluation-harness task names (optional package)
    lm_eval_limit: int | None = None  # examples per lm-eval task
    score_task: bool = True  # False: the task rows are kept (for merge parity) but not scored


def task_rows_path(cfg: PipelineConfig, run_dir: Path) -> tuple[Path, str]:
    """The held-out task rows and their format: ``data.eval_path`` as given, or the normalised split."""
    if cfg.data.eval_path:
        return Path(cfg.data.eval_path), cfg.data.format
    return run_dir / "data" / EVAL_FILENAME, "text" if cfg.data.format == "text" else "messages"


def references_path(run_dir: Path) -> Path:
    return run_dir / "eval" / REFERENCES_FILENAME


def general_prompt_rows(limit: int) -> list[dict[str, Any]]:
    """The package's general prompts as conversations whose answer is still to be written."""
    rows = []
    for line in GENERAL_PROMPTS.read_text(encoding="utf-8").splitlines()[:limit]:
        rows.append({"messages": [*json.loads(line)["messages"], {"role": "assistant", "content": ""}]})
    return rows


def write_references(rows: Sequence[dict[str, Any]], answers: Sequence[Generation], run_dir: Path) -> list[dict]:
    """The base model's answers as the regression references (one messages row per prompt)."""
    references = [{"messages": [*row["messages"][:-1], {"role": "assistant", "content": answer.text}]}
                  for row, answer in zip(rows, answers, strict=True)]
    path = references_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in references), encoding="utf-8")
    return references


def _regression_rows(cfg: PipelineConfig, run_dir: Path, has_chat_template: bool) -> tuple[list[dict], list[str]]:
    qa_path, limit = cfg.eval.regression_qa_path, cfg.eval.max_samples
    if not qa_path:
        return [], []
    if not has_chat_template:
        return [], ["regression Q/A skipped: the tokenizer has no chat template to ask questions with"]
    if qa_path != BASE_ANSWERS:
        return read_messages(qa_path, "messages")[:limit], []
    references = references_path(run_dir)
    if references.is_file():  # written by write_references; an answer may be empty (the base said nothing)
        return [json.loads(line) for line in references.read_text(encoding="utf-8").splitlines()], []
    return general_prompt_rows(limit), []


def load_eval_suites(cfg: PipelineConfig, run_dir: Path, *, has_chat_template: bool = True,
                     notes: list[str] | None = None) -> EvalSuites:
    """Held-out task rows, regression Q/A and regression text, each capped at ``eval.max_samples``.

    With ``base_answers`` before the base was scored, the regression rows are the general prompts with
    empty answers: the caller generates the base's answers and writes them with :func:`write_references`.

    Args:
        has_chat_template: False skips the chat suites that need one (a text-only base model).
        notes: receives one line per suite that was skipped and why.
    """
    limit, suites = cfg.eval.max_samples, cfg.eval.suites
    path, data_format = task_rows_path(cfg, run_dir)
    task_rows = read_messages(path, data_format)[:limit] if path.is_file() else []
    text_task = data_format == "text"
    with_regression = "regression" in suites
    qa, skipped = _regression_rows(cfg, run_dir, has_chat_template) if with_regression else ([], [])
    if notes is not None:
        notes.extend(skipped)
    text_path = cfg.eval.regression_text_path
    text = [row["text"] for row in read_messages(text_path, "text")[:limit]] if text_path and with_regression else []
    lm_eval_tasks = tuple(s.removeprefix("lm_eval:") for s in suites if s.startswith("lm_eval:"))
    # The task rows are loaded even without the `task` suite: merge parity and the registry's input
    # example use them. Scoring them is what the suite switches.
    return EvalSuites(task=[] if text_task else task_rows, task_text=[r["text"] for r in task_rows] if text_task else [],
                      regression_qa=qa, regression_text=text, lm_eval_tasks=lm_eval_tasks, lm_eval_limit=limit,
                      score_task="task" in suites)


def sample_prompts(tokenizer: Any, suites: EvalSuites, count: int, text_tokens: int = 32) -> list[list[int]]:
    """Prompt token ids for parity checks and examples: generation prompts of the task rows, or the
    first ``text_tokens`` tokens of the held-out texts for text data."""
    if suites.task:
        return [encode_generation_prompt(tokenizer, prompt_turns(row["messages"])) for row in suites.task[:count]]
    return [list(tokenizer(text)["input_ids"])[:text_tokens] for text in suites.task_text[:count]]
