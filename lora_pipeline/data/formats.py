"""Format normalisers: one raw row of any supported schema -> the one chat schema.

Output rows are ``{"messages": [{"role", "content"}, ...]}`` (``{"text": ...}`` for the ``text``
format), with every text already passed through :func:`normalise_text`. Structural problems
(``missing_field``, ``wrong_type``) leave no row; an empty required field is reported as
``empty_text`` but the row is still built, so the remaining content rules can run on it too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_pipeline.data.text import normalise_text

FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion", "text")
#: Roles kept as they are in ``messages`` rows (after lower-casing); anything else is ``bad_roles``.
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
#: ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
#: Key whose presence identifies a row's format (used to read decontamination sets of any format).
FORMAT_KEYS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
               ("prompt", "prompt_completion"), ("text", "text"))


@dataclass
class Parsed:
    """A normalised row (None when its structure is broken) and the reasons found so far."""

    row: dict[str, Any] | None
    reasons: set[str]


def _text(record: Mapping[str, Any], key: str, reasons: set[str], *, required: bool = True) -> str | None:
    """A normalised text field; None when absent/invalid (reasons recorded), "" kept for required ones."""
    value = record.get(key)
    if value is None:
        if required:
            reasons.add("missing_field")
        return None
    if not isinstance(value, str):
        reasons.add("wrong_type")
        return None
    text = normalise_text(value)
    if required and not text:
        reasons.add("empty_text")
    return text if (text or required) else None  # an empty optional field is simply absent


def _turns(value: Any, reasons: set[str], role_key: str, text_key: str,
           role_names: Mapping[str, str]) -> list[dict[str, str]] | None:
    """A list of turn objects -> normalised messages; unknown role names are kept (bad_roles later)."""
    if value is None:
        reasons.add("missing_field")
        return None
    if not isinstance(value, list):
        reasons.add("wrong_type")
        return None
    messages: list[dict[str, str]] = []
    for turn in value:
        if not isinstance(turn, Mapping):
            reasons.add("wrong_type")
            continue
        role = turn.get(role_key)
        if role is None:
            reasons.add("missing_field")
        elif not isinstance(role, str):
            reasons.add("wrong_type")
        content = _text(turn, text_key, reasons)
        if isinstance(role, str) and content is not None:
            name = role.strip().lower()
            messages.append({"role": role_names.get(name, name), "content": content})
    if not value:
        reasons.add("empty_text")  # an empty conversation has nothing to train on
    return None if reasons & {"missing_field", "wrong_type"} else messages


def _system(record: Mapping[str, Any], reasons: set[str]) -> list[dict[str, str]]:
    system = _text(record, "system", reasons, required=False)
    return [{"role": "system", "content": system}] if system else []


def _messages(record: Mapping[str, Any], reasons: set[str]) -> dict[str, Any] | None:
    messages = _turns(record.get("messages"), reasons, "role", "content", CHAT_ROLES)
    return None if messages is None else {"messages": messages}


def _sharegpt(record: Mapping[str, Any], reasons: set[str]) -> dict[str, Any] | None:
    system = _system(record, reasons)
    turns = _turns(record.get("conversations"), reasons, "from", "value", SHAREGPT_ROLES)
    return None if turns is None else {"messages": system + turns}


def _alpaca(record: Mapping[str, Any], reasons: set[str]) -> dict[str, Any] | None:
    system = _system(record, reasons)
    instruction = _text(record, "instruction", reasons)
    extra_input = _text(record, "input", reasons, required=False)
    output = _text(record, "output", reasons)
    if instruction is None or output is None or reasons & {"missing_field", "wrong_type"}:
        return None
    user = "\n\n".join(part for part in (instruction, extra_input) if part)
    return {"messages": system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _prompt_completion(record: Mapping[str, Any], reasons: set[str]) -> dict[str, Any] | None:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt-completion: both sides are lists of {"role", "content"}.
        before = _turns(prompt, reasons, "role", "content", CHAT_ROLES)
        after = _turns(completion, reasons, "role", "content", CHAT_ROLES)
        return None if before is None or after is None else {"messages": before + after}
    user = _text(record, "prompt", reasons)
    answer = _text(record, "completion", reasons)
    if user is None or answer is None:
        return None
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _plain_text(record: Mapping[str, Any], reasons: set[str]) -> dict[str, Any] | None:
    text = _text(record, "text", reasons)
    return None if text is None else {"text": text}


_NORMALISERS: dict[str, Callable[[Mapping[str, Any], set[str]], dict[str, Any] | None]] = {
    "messages": _messages,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
}


def normalise_record(record: Any, data_format: str) -> Parsed:
    """Normalise one raw row of ``data_format`` to the chat (or text) schema.

    Args:
        record: The raw row as read from the source.
        data_format: One of :data:`FORMATS`.

    Returns:
        The normalised row (None if the structure is broken) and the reason codes found.

    Raises:
        ValueError: ``data_format`` is not a supported format.
    """
    if data_format not in _NORMALISERS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {FORMATS}")
    reasons: set[str] = set()
    if not isinstance(record, Mapping):
        return Parsed(None, {"wrong_type"})
    row = _NORMALISERS[data_format](record, reasons)
    return Parsed(row, reasons)


def detect_format(record: Any) -> str | None:
    """The format a row looks like, from its keys (None if it matches none)."""
    if isinstance(record, Mapping):
        for key, data_format in FORMAT_KEYS:
            if key in record:
                return data_format
    return None
