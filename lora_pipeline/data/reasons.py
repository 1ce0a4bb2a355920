"""Quarantine reason codes and the stage's error type.

The codes are part of the data contract: they appear in ``quarantine.jsonl``, ``report.json`` and
failure messages, and dashboards or alerts may key on them, so they are short, snake_case and stable.
"""

from __future__ import annotations

#: Every reason a source row can be quarantined for, in the order they are listed on a row.
REASONS: dict[str, str] = {
    "unparseable": "The line is not valid JSON (or not valid UTF-8), or a text in it is a lone UTF-16 surrogate "
    "escape such as \\ud800 (valid JSON that no UTF-8 text can hold); the raw text is kept as the record.",
    "missing_field": "A field the format requires is absent or null (e.g. alpaca 'output', a turn's 'content').",
    "wrong_type": "A value has the wrong type: the row is not an object, a list/object/number stands where "
    "text is expected, or a turn list is not a list.",
    "empty_text": "A required text (a turn, instruction, output, text) or the whole conversation is empty or "
    "whitespace-only after normalisation.",
    "bad_roles": "Roles are unknown, or do not alternate user/assistant after an optional leading system turn, "
    "or the last turn is not an assistant turn.",
    "special_token_in_text": "The text contains a tokenizer special token (e.g. '</s>', '<|user|>'), which would "
    "forge turn boundaries or EOS once the chat template is applied.",
    "duplicate": "Exact duplicate of an earlier row after normalisation; the first occurrence is kept.",
    "contaminated": "The normalised prompt (the user turns) also appears in an evaluation or regression set.",
    "template_error": "The model's chat template cannot format the conversation as training needs it: the template "
    "refuses it (e.g. a system turn for a template without a system role), renders an earlier turn differently once "
    "later turns follow, or writes no stop token after an answer. The quarantine line's 'detail' says which. Only "
    "checked on rows that pass every text rule.",
    "no_trainable_tokens": "After the chat template and truncation to data.max_length, no answer token is left to "
    "train on (the prompt fills the budget). Only checked on rows that pass every other rule.",
}


class DataError(ValueError):
    """The data cannot be read or is invalid; the message names the file, the row (line) and the rule."""


def ordered(reasons: set[str] | list[str]) -> list[str]:
    """Reasons de-duplicated, in the fixed order of :data:`REASONS` (so outputs are stable)."""
    present = set(reasons)
    return [code for code in REASONS if code in present]
