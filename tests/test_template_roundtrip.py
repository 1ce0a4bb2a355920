"""Real chat templates, as they ship: the ids trained on are exactly the ids the template produces at inference.

Three families are rebuilt here on small BPE tokenizers, with their templates as the models ship them
(no ``{% generation %}`` markers): ChatML with a default system prompt and BOS = ``<|im_start|>`` opening
every turn (SmolLM2-Instruct), Llama 3.1 (header ids, a date header, three stop ids, EOS that is not the
end-of-turn token), and Gemma (no system role, ``<end_of_turn>``). For each: the mask covers each answer
through its stop token and nothing else, the context before every answer is the inference prompt, a
model that produces exactly the trained ids is read back by evaluation as the answer, and the stop set
holds every stop id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lora_pipeline.evaluation import score_generation_suite
from lora_pipeline.formatting import (
    IGNORE_INDEX,
    FormatError,
    RowFormatError,
    chat_ids,
    check_tokenizer,
    encode_generation_prompt,
    end_of_turn_token_id,
    stop_token_ids,
    tokenize_conversation,
)

SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One template family: its tokenizer's special tokens, its template, and its generation config's eos ids."""

    template: str
    bos: str
    eos: str
    pad: str | None
    specials: tuple[str, ...]
    end_of_turn: str
    generation_eos: tuple[str, ...]  # token strings of generation_config.eos_token_id
    kept_text: tuple[str, ...] = field(default=())  # template text every prompt must carry (system prompt, date)


FAMILIES = {
    "chatml-smollm2": Family(SMOLLM2_CHATML, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                             specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>",
                             generation_eos=("<|im_end|>",),
                             kept_text=("You are a helpful AI assistant named SmolLM",)),
    "llama3.1": Family(LLAMA31, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                       specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|eot_id|>", "<|eom_id|>"), end_of_turn="<|eot_id|>",
                       generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                       kept_text=("Today Date: 26 Jul 2024", "Cutting Knowledge Date")),
    "gemma": Family(GEMMA, bos="<bos>", eos="<eos>", pad="<pad>",
                    specials=("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), end_of_turn="<end_of_turn>",
                    generation_eos=("<eos>", "<end_of_turn>")),
}
CORPUS = ["what is the capital of france? paris is the capital of france.", "add two and three. five.",
          "translate hello to french. bonjour.", "you are a helpful assistant. answer briefly."]
SYSTEM = {"role": "system", "content": "Answer with one word."}
TURNS = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"},
         {"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Five"},
         {"role": "user", "content": "Translate hello to French."}, {"role": "assistant", "content": "Bonjour"}]
CONVERSATIONS = {"one-turn": TURNS[:2], "multi-turn": TURNS, "system": [SYSTEM, *TURNS[:4]]}


def build_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=list(family.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad or family.eos)
    tokenizer.chat_template = family.template
    return tokenizer


def applicable(family_name: str, conversation: str) -> bool:
    return not (family_name == "gemma" and conversation == "system")  # Gemma has no system role


def trained_runs(labels: list[int]) -> list[tuple[int, list[int]]]:
    """(start, ids) of every maximal run of trained labels."""
    runs: list[tuple[int, list[int]]] = []
    for position, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][0] + len(runs[-1][1]) == position:
            runs[-1][1].append(label)
        else:
            runs.append((position, [label]))
    return runs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    spec = FAMILIES[request.param]
    tokenizer = build_tokenizer(spec)
    generation_eos = [tokenizer.convert_tokens_to_ids(token) for token in spec.generation_eos]
    return request.param, spec, tokenizer, stop_token_ids(tokenizer, generation_eos)


def test_stop_set_holds_eos_every_generation_eos_and_the_end_of_turn(family):
    _, spec, tokenizer, stops = family
    ids = tokenizer.convert_tokens_to_ids
    assert end_of_turn_token_id(tokenizer) == ids(spec.end_of_turn)
    assert stops == sorted({ids(spec.eos), ids(spec.end_of_turn), *map(ids, spec.generation_eos)})
    check_tokenizer(tokenizer, stops)  # BOS per the template's own rendering, a stop after every answer


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_trained_ids_are_what_the_template_produces_at_inference(family, conversation):
    name, spec, tokenizer, stops = family
    if not applicable(name, conversation):
        pytest.skip("Gemma's template has no system role (refusal tested below)")
    messages = CONVERSATIONS[conversation]
    sample = tokenize_conversation(tokenizer, messages, max_length=4096, stop_ids=stops)
    assert sample.input_ids == chat_ids(tokenizer, messages, generation_prompt=False)  # the template's own ids
    answers = [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = trained_runs(sample.labels)
    assert len(runs) == len(answers)
    for (index, content), (start, run) in zip(answers, runs, strict=True):
        prompt = encode_generation_prompt(tokenizer, messages[:index])
        # The context of every trained answer is exactly the prompt the model is given at inference ...
        assert start == len(prompt) and sample.input_ids[:start] == prompt
        # ... and what it is trained to produce, followed by the template's turn, is the template's rendering.
        assert prompt + run == chat_ids(tokenizer, messages[: index + 1], generation_prompt=False)[: len(prompt) + len(run)]
        assert tokenizer.decode(run) == content + spec.end_of_turn
        assert run[-1] in stops and not any(token in stops for token in run[:-1])
    assert sample.trained_stops == sample.answers_in_budget == len(answers)
    kept = spec.kept_text if messages[0]["role"] != "system" else ()  # a user's system turn replaces a default one
    for text in kept:  # default system prompt / date header: in the training context and the inference prompt
        assert text in tokenizer.decode(sample.input_ids)
        assert text in tokenizer.decode(encode_generation_prompt(tokenizer, messages[:1]))


def test_a_model_producing_the_trained_ids_is_read_back_as_the_answer(family):
    # Round trip through evaluation's own generation code: a scripted model emits exactly the trained
    # ids after the inference prompt (then junk); evaluation must stop there and read back the answer.
    _, _, tokenizer, stops = family
    messages = CONVERSATIONS["one-turn"]
    (_, run), = trained_runs(tokenize_conversation(tokenizer, messages, 4096, stops).labels)
    junk = tokenizer("add two", add_special_tokens=False)["input_ids"]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
            assert sorted(eos_token_id) == stops  # generation is told every stop id
            tokens = (run + junk)[:max_new_tokens]
            return torch.cat([input_ids, torch.tensor([tokens])], dim=1)

    records: list[dict] = []
    scores = score_generation_suite(Scripted(), tokenizer, [{"messages": messages}], max_new_tokens=32, batch_size=1,
                                    stop_ids=stops, records=records)
    assert scores["exact_match"] == 1.0 and scores["stop_rate"] == 1.0
    assert records[0]["answer"] == "Paris"


def test_bos_opening_every_turn_is_not_a_double_bos():
    # SmolLM2 declares <|im_start|> as its BOS: three in a templated conversation is the template's own doing.
    tokenizer = build_tokenizer(FAMILIES["chatml-smollm2"])
    sample = tokenize_conversation(tokenizer, CONVERSATIONS["one-turn"], 4096)
    assert sample.input_ids.count(tokenizer.bos_token_id) == 3
    check_tokenizer(tokenizer)


def test_gemma_refuses_a_system_turn_per_row_not_per_tokenizer():
    tokenizer = build_tokenizer(FAMILIES["gemma"])
    with pytest.raises(RowFormatError, match="^template_error: .*System role not supported"):
        tokenize_conversation(tokenizer, CONVERSATIONS["system"], 4096)
    check_tokenizer(tokenizer)  # the tokenizer itself is fine: such rows are quarantined


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_rule():
    tokenizer = build_tokenizer(FAMILIES["gemma"])
    tokenizer.chat_template = None
    with pytest.raises(FormatError, match="^chat_template: "):
        check_tokenizer(tokenizer)
    check_tokenizer(tokenizer, chat=False)  # text data needs no template
