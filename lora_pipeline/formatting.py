"""The one prompt formatter: training, evaluation and serving all go through these functions.

Training samples are tokenized here (not inside the trainer) so the loss mask is derived and checked
rather than assumed. The mask comes from the model's own chat template, whatever it is, in one way
that needs no ``{% generation %}`` markers: for each assistant turn the conversation is rendered up to
that turn *with the generation prompt* (exactly what the model sees at inference) and up to and
including the turn; the tokens between the two, through the first stop token, are what the model has
to produce, so they are trained, and nothing else is. Default system prompts, date headers and other
template text are therefore identical in training, evaluation and serving.

The stop set (:func:`stop_token_ids`) is the tokenizer's EOS, every id of the model's
``generation_config.eos_token_id`` and the template's own end-of-turn token; every assistant turn must
end in a trained token of that set, otherwise the model never learns to stop.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and TRL) skips

#: A conversation rendered to check a tokenizer and to find its template's end-of-turn token.
_PROBE_ANSWER = "lora pipeline probe answer"
PROBE_CONVERSATION = ({"role": "user", "content": "lora pipeline probe question"},
                      {"role": "assistant", "content": _PROBE_ANSWER})


class FormatError(ValueError):
    """A tokenizer cannot be used for training; the message starts with the rule that failed."""


class RowFormatError(FormatError):
    """One conversation cannot be formatted (the data stage quarantines it as ``template_error``)."""


@dataclass(frozen=True)
class TokenizedSample:
    """One conversation (or text row) as model inputs, after truncation to the token budget."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    full_length: int  # templated length before truncation
    answers_in_budget: int  # assistant turns (a text row: its final EOS) whose stop token fits the budget
    trained_stops: int  # labels (within the budget) that are stop tokens: equals answers_in_budget when right

    @property
    def n_trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class FormatReport:
    """What the format stage did, for the summary and the data report."""

    n_rows: int = 0
    n_written: int = 0
    n_truncated: int = 0
    n_no_trainable_tokens: int = 0
    n_template_errors: int = 0
    mean_tokens: float = 0.0
    max_tokens: int = 0
    trainable_token_fraction: float = 0.0
    eos_unmasked_turns: int = 0  # answers ending in a trained stop token (EOS or end-of-turn)
    stop_token_ids: list[int] = field(default_factory=list)
    pad_is_eos: bool = False  # safe (labels are padded with -100 by position) but worth knowing
    rejected_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    """Token ids of the chat template applied to ``messages`` (no special tokens added on top)."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                            tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def render_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """Text the model continues to answer: chat template applied with the generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of :func:`render_generation_prompt`: the inference prompt, and each answer's training context."""
    return chat_ids(tokenizer, messages, generation_prompt=True)


def prompt_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its final assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise FormatError("a conversation must end with an assistant turn")
    return list(messages[:-1])


def _control_token_ids(tokenizer: Any) -> set[int]:
    """Special and added tokens (turn markers such as ``<|eot_id|>`` are often added, not "special")."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The control token the template writes right after an assistant answer, if any.

    ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, or EOS itself; None
    when the template writes plain text (or nothing) there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template(list(PROBE_CONVERSATION), tokenize=False)
    at = text.find(_PROBE_ANSWER)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE_ANSWER):], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in _control_token_ids(tokenizer) else None


def stop_token_ids(tokenizer: Any, generation_eos: int | Iterable[int] | None = None) -> list[int]:
    """Every id that ends an answer: EOS, ``generation_config.eos_token_id`` (one or a list), end-of-turn."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if generation_eos is not None:
        ids.update([int(generation_eos)] if isinstance(generation_eos, int) else (int(i) for i in generation_eos))
    end_of_turn = end_of_turn_token_id(tokenizer)
    if end_of_turn is not None:
        ids.add(int(end_of_turn))
    return sorted(ids)


def check_tokenizer(tokenizer: Any, stop_ids: Sequence[int] | None = None, *, chat: bool = True) -> None:
    """Refuse a tokenizer that cannot produce a trustworthy training sample.

    For chat data a probe conversation goes through :func:`tokenize_conversation`, so a template
    that cannot be masked, loses its stop token or adds a BOS twice is refused here, once, instead
    of quarantining every row.

    Raises:
        FormatError: ``<rule>: <why>``, rule one of ``chat_template``, ``eos_token``, ``pad_token``,
            ``bos_once``, ``answer_ends_in_stop_token``, ``template_prefix``, ``template_error``.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise FormatError("chat_template: the tokenizer has no chat template; set model.chat_template "
                          "(chatml, llama3, alpaca) or use data.format=text")
    if tokenizer.eos_token_id is None:
        raise FormatError("eos_token: the tokenizer has no EOS token, so generations could never stop")
    if tokenizer.pad_token_id is None:
        # modeling.load_tokenizer fills a missing pad in (UNK, else EOS: safe, labels are precomputed);
        # a tokenizer that reaches here without one was loaded some other way.
        raise FormatError("pad_token: the tokenizer has no pad token; load it with "
                          "lora_pipeline.modeling.load_tokenizer or set one")
    if not chat:
        return
    text = tokenizer.apply_chat_template(list(PROBE_CONVERSATION), tokenize=False)
    bos = tokenizer.bos_token
    try:
        sample = tokenize_conversation(tokenizer, PROBE_CONVERSATION, max_length=1 << 30, stop_ids=stop_ids)
    except RowFormatError as exc:
        raise FormatError(f"{exc} (on a probe conversation: the tokenizer's chat template cannot be trained)") from exc
    if bos and sample.input_ids.count(tokenizer.bos_token_id) != text.count(bos):
        raise FormatError(f"bos_once: the tokenized conversation has {sample.input_ids.count(tokenizer.bos_token_id)} "
                          f"BOS tokens where the template renders {text.count(bos)}: a BOS is added twice")


def _first_stop(ids: Sequence[int], start: int, stops: set[int]) -> int | None:
    return next((i for i in range(start, len(ids)) if ids[i] in stops), None)


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int,
                          stop_ids: Sequence[int] | None = None) -> TokenizedSample:
    """Template, tokenize and mask one conversation; labels are -100 outside assistant answers.

    Each assistant turn's trained tokens start where the generation prompt for that turn ends and
    run through the first stop token: the ids the model must generate at inference, nothing else.

    Args:
        stop_ids: the stop set (:func:`stop_token_ids`); derived from the tokenizer alone when None.

    Raises:
        RowFormatError: the template refuses the conversation (``template_error``), renders a turn
            differently once later turns follow (``template_prefix``), or an assistant turn has no
            stop token after it (``answer_ends_in_stop_token``).
    """
    stops = set(stop_ids if stop_ids is not None else stop_token_ids(tokenizer))
    try:
        full = chat_ids(tokenizer, messages, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(full)
        answer_ends: list[int] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = chat_ids(tokenizer, messages[:index], generation_prompt=True)
            turn = full if index == len(messages) - 1 else chat_ids(tokenizer, messages[: index + 1],
                                                                     generation_prompt=False)
            if full[: len(turn)] != turn or turn[: len(prompt)] != prompt:
                raise RowFormatError(f"template_prefix: assistant turn {index} is not rendered as the continuation "
                                     "of its generation prompt, so training would not match inference")
            end = _first_stop(turn, len(prompt), stops)
            if end is None:
                raise RowFormatError(f"answer_ends_in_stop_token: assistant turn {index} is not followed by a stop "
                                     f"token {sorted(stops)}, so the model would never learn to stop")
            labels[len(prompt): end + 1] = full[len(prompt): end + 1]
            answer_ends.append(end)
    except TemplateError as exc:  # raise_exception() in the template (a role it lacks), or a broken template
        raise RowFormatError(f"template_error: the chat template refused the conversation: {exc}") from exc
    if not answer_ends:
        raise RowFormatError("template_error: the conversation has no assistant turn to train on")
    return _truncated(full, labels, answer_ends, max_length, stops)


def _truncated(input_ids: list[int], labels: list[int], answer_ends: list[int], max_length: int,
               stops: set[int]) -> TokenizedSample:
    kept = labels[:max_length]
    return TokenizedSample(
        input_ids=input_ids[:max_length],
        labels=kept,
        truncated=len(input_ids) > max_length,
        full_length=len(input_ids),
        answers_in_budget=sum(end < max_length for end in answer_ends),
        trained_stops=sum(label in stops for label in kept),
    )


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> TokenizedSample:
    """One ``text`` row (continued pre-training): the tokenizer's own framing (its BOS, if it adds one),
    then EOS; every token is trained (the first is never a target)."""
    input_ids = list(tokenizer(text)["input_ids"])
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX, *input_ids[1:]]
    return _truncated(input_ids, labels, [len(input_ids) - 1], max_length, {tokenizer.eos_token_id})


def tokenize_row(tokenizer: Any, row: dict[str, Any], max_length: int,
                 stop_ids: Sequence[int] | None = None) -> TokenizedSample:
    """A normalised data-stage row (``{"messages": [...]}`` or ``{"text": ...}``) as a training sample."""
    if "messages" in row:
        return tokenize_conversation(tokenizer, row["messages"], max_length, stop_ids)
    return tokenize_text(tokenizer, row["text"], max_length)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, row) of a JSONL file, skipping blank lines."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                yield line_no, json.loads(line)


def format_dataset(tokenizer: Any, clean_path: Path, out_path: Path, max_length: int,
                   stop_ids: Sequence[int] | None = None, *, chat: bool = True) -> FormatReport:
    """Tokenize every clean row into ``out_path`` (JSONL of input_ids/labels) and count the masks.

    Rows that cannot be formatted or keep no trainable token after truncation are not written; their
    line numbers are reported. (The data stage, given the same tokenizer and budget, already
    quarantines such rows; this is the safety net for a clean file produced elsewhere.)

    Raises:
        FormatError: the tokenizer cannot be used (see :func:`check_tokenizer`).
    """
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    check_tokenizer(tokenizer, stops, chat=chat)
    report = FormatReport(pad_is_eos=tokenizer.pad_token_id == tokenizer.eos_token_id, stop_token_ids=stops)
    lengths: list[int] = []
    trainable = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as out:
        for line_no, row in iter_jsonl(clean_path):
            report.n_rows += 1
            try:
                sample = tokenize_row(tokenizer, row, max_length, stops)
            except RowFormatError:
                report.n_template_errors += 1
                report.rejected_lines.append(line_no)
                continue
            report.n_truncated += sample.truncated
            if sample.n_trainable == 0:
                report.n_no_trainable_tokens += 1
                report.rejected_lines.append(line_no)
                continue
            report.eos_unmasked_turns += sample.trained_stops
            lengths.append(len(sample.input_ids))
            trainable += sample.n_trainable
            out.write(json.dumps({"input_ids": sample.input_ids, "labels": sample.labels}) + "\n")
    report.n_written = len(lengths)
    if lengths:
        report.mean_tokens = round(statistics.fmean(lengths), 2)
        report.max_tokens = max(lengths)
        report.trainable_token_fraction = round(trainable / sum(lengths), 4)
    return report
