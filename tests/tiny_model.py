"""Build a tiny, offline Llama model directory for tests (no model hub needed).

The directory looks like any Hugging Face causal-LM checkpoint: ``config.json`` + safetensors
weights, a fast tokenizer with a chat template and distinct bos/eos/pad tokens, and a
``generation_config.json`` carrying the eos/pad ids. Weights are random (seeded), so tests may
rely on shapes, formats and stopping behaviour, never on what the model says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: Plain-text chat format: every turn is ``<|role|>`` + content, assistant turns end with EOS, and
#: the generation prompt opens an assistant turn, so a trained model would answer then emit EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Enough text for the BPE trainer to learn a few hundred merges of ordinary English.
_DEFAULT_CORPUS = (
    "what is the capital of france? the capital of france is paris.",
    "add two and three. two plus three is five.",
    "translate hello to french. hello in french is bonjour.",
    "the quick brown fox jumps over the lazy dog.",
    "answer the question with one word. the answer is yes or no.",
    "a small model learns to follow instructions and stop at the end of its answer.",
)


@dataclass(frozen=True)
class TinyModelInfo:
    """Where the tiny model was written and the ids tests usually need."""

    path: Path
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def build_tiny_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text encodes, decoding round-trips) on a small corpus.

    Args:
        corpus: Extra lines to train on, added to a built-in English corpus.
        vocab_size: Upper bound of the vocabulary (bytes + specials + merges).

    Returns:
        A fast tokenizer with bos/eos/pad/unk set (pad != eos) and the chat template installed.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE(unk_token=None))
    # Deliberately not the demo world's tokenizer (lora_pipeline.demo_world.tokenizer), which adds a
    # prefix space: tests also see the GPT-2/Llama-3 convention, where "cat" after a marker differs.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_DEFAULT_CORPUS, *corpus], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    path: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    corpus: Iterable[str] = (),
    seed: int = 0,
    max_new_tokens: int = 16,
) -> TinyModelInfo:
    """Write a tiny random ``LlamaForCausalLM`` + tokenizer + generation config into ``path``.

    Args:
        path: Target directory (created if missing).
        hidden_size: Model width; 4 attention heads, 2 key/value heads.
        num_layers: Decoder layers.
        corpus: Extra tokenizer training text (see ``build_tiny_tokenizer``).
        seed: Seed for the weights, so two builds with the same arguments are identical.
        max_new_tokens: Default generation budget stored in ``generation_config.json``.

    Returns:
        The path and the special-token ids.
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(corpus)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Greedy by default so tests are deterministic; eos as a list like recent Llama checkpoints.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"]],
        pad_token_id=ids["pad_token_id"],
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    model.save_pretrained(path)  # safetensors is the default (and only) format in transformers 5
    tokenizer.save_pretrained(path)
    return TinyModelInfo(path=path, vocab_size=len(tokenizer), **ids)
