"""A byte-level BPE tokenizer for the demo world, with a chat template that marks what to train on.

Trained with the ``tokenizers`` library on the base model's pre-training text only (as a real base
model's tokenizer is), then wrapped as a transformers fast tokenizer so ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lora_pipeline.demo_world.spec import DemoWorldSpec

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: ``<s><|user|>question<|assistant|>answer</s>``: exactly one BOS, each assistant turn ends in EOS,
#: and the answer *and* its EOS sit inside {% generation %} so assistant-only losses (TRL's
#: ``assistant_only_loss``, ``return_assistant_tokens_mask``) train the model to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], spec: DemoWorldSpec) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on ``texts`` and install special tokens and the chat template.

    Args:
        texts: Plain text to learn merges from (message contents and documents, no markup).
        spec: ``vocab_size`` bounds the vocabulary; ``max_position_embeddings`` is the model limit.

    Returns:
        A fast tokenizer with pad != eos, no automatic BOS/EOS (the chat template adds them, so
        templated text never gets a second BOS), and the chat template set.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    # add_prefix_space: a word is the same token after a role marker as inside a sentence, so a tiny
    # model does not have to learn two spellings of every name.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes: no UNK in practice
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_texts(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    """The raw strings of chat rows and text documents (what the BPE merges are learned from)."""
    for row in rows:
        if "text" in row:
            yield row["text"]
        else:
            yield from (message["content"] for message in row["messages"])
