"""The one prompt formatter: training, evaluation and serving all go through these functions.

Training samples are tokenized here (not inside the trainer) so the loss mask is counted and checked
rather than assumed: every assistant turn must end in an EOS token whose label is *not* masked,
otherwise the model never learns to stop.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and TRL) skips


class FormatError(ValueError):
    """A tokenizer or a sample cannot be formatted safely; the message says which rule failed."""


@dataclass(frozen=True)
class TokenizedSample:
    """One conversation (or text row) as model inputs, after truncation to the token budget."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_length: int  # templated length before truncation
    answers_in_budget: int  # assistant turns (a text row: its single EOS) whose last token fits the budget

    @property
    def n_trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def trained_eos(self, eos_token_id: int) -> int:
        """EOS tokens whose label is kept: equals ``answers_in_budget`` when every answer ends in a trained EOS."""
        return sum(label == eos_token_id for label in self.labels)


@dataclass
class FormatReport:
    """What the format stage did, for the summary and the data report."""

    n_rows: int = 0
    n_written: int = 0
    n_truncated: int = 0
    n_no_trainable_tokens: int = 0
    mean_tokens: float = 0.0
    max_tokens: int = 0
    trainable_token_fraction: float = 0.0
    eos_unmasked_turns: int = 0
    pad_is_eos: bool = False  # safe (labels are padded with -100 by position) but worth knowing
    rejected_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer that cannot produce a trustworthy training sample.

    Raises:
        FormatError: no chat template, no EOS, or no pad token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError("tokenizer has no chat template: set one before training")
    if tokenizer.eos_token_id is None:
        raise FormatError("tokenizer has no EOS token: generations could never stop")
    if tokenizer.pad_token_id is None:
        # modeling.load_tokenizer fills a missing pad in (UNK, else EOS: safe, labels are precomputed);
        # a tokenizer that reaches here without one was loaded some other way.
        raise FormatError("tokenizer has no pad token: load it with lora_pipeline.modeling.load_tokenizer "
                          "or set one (a distinct token is preferable to EOS)")


def prompt_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its final assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise FormatError("a conversation must end with an assistant turn")
    return list(messages[:-1])


def render_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """Text the model continues to answer: chat template applied with the generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of :func:`render_generation_prompt` (no second BOS: the template already has one)."""
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int) -> TokenizedSample:
    """Template, tokenize and mask one conversation; labels are -100 outside assistant turns.

    Raises:
        FormatError: the template does not start with exactly one BOS, marks no assistant tokens, or
            leaves an assistant turn without an unmasked EOS.
    """
    encoded = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded["input_ids"])
    mask = list(encoded["assistant_masks"])
    _check_special_tokens(tokenizer, input_ids, mask, messages)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask, strict=True)]
    answer_ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    return TokenizedSample(
        input_ids=input_ids[:max_length],
        labels=labels[:max_length],
        truncated=len(input_ids) > max_length,
        full_length=len(input_ids),
        answers_in_budget=sum(end < max_length for end in answer_ends),
    )


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> TokenizedSample:
    """One ``text`` row (continued pre-training): BOS + text + EOS, every token after BOS trained."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids = bos + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(bos) + input_ids[len(bos):]
    return TokenizedSample(
        input_ids=input_ids[:max_length],
        labels=labels[:max_length],
        truncated=len(input_ids) > max_length,
        full_length=len(input_ids),
        answers_in_budget=int(len(input_ids) <= max_length),
    )


def tokenize_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> TokenizedSample:
    """A normalised data-stage row (``{"messages": [...]}`` or ``{"text": ...}``) as a training sample."""
    if "messages" in row:
        return tokenize_conversation(tokenizer, row["messages"], max_length)
    return tokenize_text(tokenizer, row["text"], max_length)


def _check_special_tokens(
    tokenizer: Any, input_ids: list[int], mask: list[int], messages: Sequence[dict[str, str]]
) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and (not input_ids or input_ids[0] != bos or input_ids.count(bos) != 1):
        raise FormatError(f"templated sample must start with exactly one BOS (found {input_ids.count(bos)})")
    if not any(mask):
        raise FormatError("chat template marks no assistant tokens: it needs {% generation %} markers")
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    eos = tokenizer.eos_token_id
    trained_eos = sum(1 for tok, keep in zip(input_ids, mask, strict=True) if keep and tok == eos)
    ends_ok = all(
        input_ids[i] == eos for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])
    )
    if trained_eos != n_assistant or not ends_ok:
        raise FormatError(
            f"every assistant turn must end in an unmasked EOS: {n_assistant} turns, {trained_eos} trained EOS"
        )


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, row) of a JSONL file, skipping blank lines."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                yield line_no, json.loads(line)


def format_dataset(tokenizer: Any, clean_path: Path, out_path: Path, max_length: int) -> FormatReport:
    """Tokenize every clean row into ``out_path`` (JSONL of input_ids/labels) and count the masks.

    Rows left with no trainable token after truncation are not written; their line numbers are reported.
    (The data stage, given the same tokenizer and budget, already quarantines such rows; this is the
    safety net for a clean file produced elsewhere.)
    """
    check_tokenizer(tokenizer)
    report = FormatReport(pad_is_eos=tokenizer.pad_token_id == tokenizer.eos_token_id)
    lengths: list[int] = []
    trainable = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as out:
        for line_no, row in iter_jsonl(clean_path):
            report.n_rows += 1
            sample = tokenize_row(tokenizer, row, max_length)
            report.n_truncated += sample.truncated
            if sample.n_trainable == 0:
                report.n_no_trainable_tokens += 1
                report.rejected_lines.append(line_no)
                continue
            report.eos_unmasked_turns += sample.trained_eos(tokenizer.eos_token_id)
            lengths.append(len(sample.input_ids))
            trainable += sample.n_trainable
            out.write(json.dumps({"input_ids": sample.input_ids, "labels": sample.labels}) + "\n")
    report.n_written = len(lengths)
    if lengths:
        report.mean_tokens = round(statistics.fmean(lengths), 2)
        report.max_tokens = max(lengths)
        report.trainable_token_fraction = round(trainable / sum(lengths), 4)
    return report
