"""Named chat templates for base models whose tokenizer has none (or one that cannot mark answers).

Every template here follows the same rules as the demo world's (``demo_world/tokenizer.py``):

- ``{{ bos_token }}`` once at the start, only if the tokenizer has a BOS token;
- each assistant answer *and* the ``{{ eos_token }}`` closing it sit inside ``{% generation %}``, so
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's assistant-only loss) train
  the answer and the stop token, and nothing else;
- ``add_generation_prompt`` ends the text with the assistant header, where the model starts answering.

The turn markers (``<|im_start|>``, ``<|start_header_id|>``, ...) are written as text. If the tokenizer
has them as tokens they encode as one id each; otherwise they encode as a few ordinary tokens. We never
add tokens: that would resize the embeddings of a 4-bit base.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
_ANSWER = "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"

#: ``<|im_start|>role\ncontent<|im_end|>\n``; an assistant turn ends with the tokenizer's EOS instead
#: (``<|im_end|>`` itself for ChatML instruct tokenizers).
CHATML = (
    _BOS
    + "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}" + _ANSWER + "{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: ``<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>``; an assistant turn ends with EOS.
LLAMA3 = (
    _BOS
    + "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}" + _ANSWER
    + "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

#: System text, then ``### Instruction:\nuser\n\n### Response:\nanswer</s>`` per exchange.
ALPACA = (
    _BOS
    + "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}" + _ANSWER + "{{ '\\n\\n' }}"
    "{% else %}{{ raise_exception('alpaca template: unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

#: Template name (``model.chat_template``) -> Jinja source.
CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}

# Markers a tokenizer built for the template has as single tokens; missing ones are only worth a note.
_CONTROL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}
# Text that opens or closes a turn in each template: inside message text it would forge a turn.
_TURN_MARKERS: dict[str, tuple[str, ...]] = {**_CONTROL_TOKENS, "alpaca": ("### Instruction:", "### Response:")}


def turn_markers(name: str) -> tuple[str, ...]:
    """Strings that delimit turns in template ``name`` ("tokenizer": none beyond its special tokens).

    The data stage quarantines rows whose text contains one (``special_token_in_text``): a marker that
    is not a special token of the vocabulary is still a turn boundary once the template is applied.
    """
    return () if name == "tokenizer" else _TURN_MARKERS[name]


def get_chat_template(name: str) -> str:
    """The Jinja source of the template called ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`CHAT_TEMPLATES`; the message lists the valid names.
    """
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        choices = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}: choose one of {choices}") from None


def apply_named_template(tokenizer: Any, name: str) -> Any:
    """Install the named template as ``tokenizer.chat_template`` (in place) and return the tokenizer.

    Saving the tokenizer afterwards (adapter and merged dirs) carries the template along, so training,
    evaluation and serving render prompts identically.

    Raises:
        ValueError: unknown ``name``.
    """
    tokenizer.chat_template = get_chat_template(name)
    vocab = tokenizer.get_vocab()
    missing = [token for token in _CONTROL_TOKENS[name] if token not in vocab]
    if missing:
        logger.warning(
            "chat template %s: %s not in the vocabulary, encoded as plain text (works, costs a few tokens)",
            name, ", ".join(missing),
        )
    return tokenizer
