"""`serve` prefills the prompt prefix requests share once and reuses its KV cache: every answer stays what it
is without the cache (text, finish reason, usage), alone and batched, and later requests prefill their own
tokens only. Throughput on SmolLM2: benchmarks/serving.py."""

from __future__ import annotations

import functools

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from lora_pipeline.serving import CompletionRequest, FixedModel, TextGenerator, build_app
from lora_pipeline.serving_prefix import MIN_SHARED_PREFIX_TOKENS, PrefixCache, cache_argument, common_prefix_length
from tests.conftest import ANIMALS, COLOURS
from tests.helpers.scripted_model import ScriptedModel

WORDS = COLOURS + ANIMALS
#: Instructions every request starts with (as a service's fixed system prompt would be): 24 words.
SHARED = " ".join(WORDS[i % len(WORDS)] for i in range(24))


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _tail(start: int, words: int) -> str:
    return " ".join(WORDS[(start * 5 + i) % len(WORDS)] for i in range(words))


def _record_prefills(model) -> list[int]:
    """Wraps ``model.forward``: the width of each call's input that is longer than one token (a prefill)."""
    widths: list[int] = []
    forward = model.forward

    @functools.wraps(forward)
    def recorded(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = recorded
    return widths


def test_common_prefix_and_which_models_take_part():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 6], [7]]) == 0 and common_prefix_length([[1, 2]]) == 2
    scripted = ScriptedModel([1], eos_token_id=2)  # no forward, no cache: generated as before
    assert cache_argument(scripted) is None
    with pytest.raises(ValueError, match="takes no KV cache"):
        PrefixCache(scripted)


def test_a_shared_prefix_is_prefilled_once_and_every_answer_is_as_without_it(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cached, plain = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, reuse_prefix=False)
    assert plain.prefix_cache is None
    request = CompletionRequest(prompt="x", max_tokens=10)
    prompts = [cached.text_prompt_ids(f"{SHARED} {_tail(i, words)}") for i, words in enumerate([3, 1, 6, 2, 9, 4])]
    shared = common_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX_TOKENS
    expected = [plain._generate_batch([(prompt, request)])[0] for prompt in prompts]

    prefills = _record_prefills(model)
    # The first request is prefilled whole (nothing seen to share yet); the second shares the first's start:
    # that prefix is prefilled once and kept, then the second request's own tokens.
    assert [cached._generate_batch([(prompt, request)])[0] for prompt in prompts[:2]] == expected[:2]
    assert cached.prefix_cache.ids == prompts[0][:shared]
    assert prefills == [len(prompts[0]), shared, len(prompts[1]) - shared]  # (decoding steps, 1 token: not recorded)
    prefills.clear()
    # From then on, alone or batched (left-padded behind the prefix), only each request's own tokens are prefilled.
    assert cached._generate_batch([(prompts[2], request)]) == [expected[2]]
    batch = [(prompt, request) for prompt in prompts[2:]]
    assert cached._generate_batch(batch) == expected[2:]
    assert prefills == [len(prompts[2]) - shared, max(len(prompt) for prompt in prompts[2:]) - shared]
    assert len({tuple(result.text.split()) for result in expected}) > 1  # the answers differ: the test has teeth


def test_other_instructions_replace_the_prefix_and_unrelated_prompts_leave_it(tokenizer, tiny_model_dir):
    """Batches: by what their prompts share. Lone requests: by what each shares with the one before."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cached, plain = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, reuse_prefix=False)
    request = CompletionRequest(prompt="x", max_tokens=8)
    other = " ".join(reversed(SHARED.split()))
    first = [cached.text_prompt_ids(f"{SHARED} {_tail(i, 2)}") for i in range(2)]
    second = [cached.text_prompt_ids(f"{other} {_tail(i, 3)}") for i in range(3)]
    short = [cached.text_prompt_ids(_tail(i, 2)) for i in range(2)]
    for prompts in (first, second, short):
        assert cached._generate_batch([(p, request) for p in prompts]) == plain._generate_batch(
            [(p, request) for p in prompts])
        if prompts is first:
            assert cached.prefix_cache.ids == first[0][:common_prefix_length(first)]
    assert cached.prefix_cache.ids == second[0][:common_prefix_length(second)]  # short ones shared too little
    lone = [first[0], *short, first[1]]  # back to the first instructions, with an unrelated request between
    expected = [plain._generate_batch([(p, request)])[0] for p in lone]
    prefills = _record_prefills(model)
    assert [cached._generate_batch([(p, request)])[0] for p in lone] == expected
    assert cached.prefix_cache.ids == second[0][:common_prefix_length(second)]  # nothing shared twice in a row
    assert prefills == [len(p) for p in lone]  # each prefilled whole, in one call
    assert cached._generate_batch([(first[1], request)]) == plain._generate_batch([(first[1], request)])
    assert cached.prefix_cache.ids == first[1][:common_prefix_length([first[1], first[1][:-1]])]


def test_chat_requests_over_http_answer_as_without_the_cache(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    clients = {reuse: TestClient(build_app(FixedModel(TextGenerator(model, tokenizer, reuse_prefix=reuse)), "tiny@a"))
               for reuse in (True, False)}
    bodies = [{"messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": _tail(i, 1 + i)}],
               "max_tokens": 6} for i in range(4)]
    replies = {reuse: [client.post("/v1/chat/completions", json=body).json() for body in bodies]
               for reuse, client in clients.items()}
    assert [(r["choices"], r["usage"]) for r in replies[True]] == [(r["choices"], r["usage"]) for r in replies[False]]


def test_a_sliding_window_model_is_generated_as_before(tokenizer):
    """Copying and continuing a cache is exact for full-attention layers only: others opt out at the first prefix."""
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    cached, plain = TextGenerator(model, tokenizer), TextGenerator(model, tokenizer, reuse_prefix=False)
    request = CompletionRequest(prompt="x", max_tokens=6)
    prompts = [cached.text_prompt_ids(f"{SHARED} {_tail(i, 2)}") for i in range(3)]
    assert cached._generate_batch([(p, request) for p in prompts]) == plain._generate_batch(
        [(p, request) for p in prompts])
    assert cached.prefix_cache.enabled is False and cached.prefix_cache.ids == []
