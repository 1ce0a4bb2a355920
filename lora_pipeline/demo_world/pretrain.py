"""Pre-train the demo world's tiny Llama on its regression corpus (plain torch loop, CPU, float32).

Chat rows are trained on their assistant tokens and EOS only (the template's generation mask), as
an instruction-tuned base would be: the model learns to answer and to stop, and spends no capacity
predicting random user prompts. Text documents are trained on every token, for perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from lora_pipeline.demo_world.spec import DemoWorldSpec

IGNORE_INDEX = -100  # label value cross-entropy skips
Sample = tuple[list[int], list[int]]  # (input_ids, labels)


def model_config(spec: DemoWorldSpec, tokenizer: Any) -> LlamaConfig:
    """Llama architecture config from the spec, with the tokenizer's vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        # Tied: the embedding is not quantised by bitsandbytes, and untied output rows for rare tokens
        # would stay near random.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def generation_config(tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding that stops at EOS and pads with the (distinct) pad token."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> list[Sample]:
    """Token ids and labels of every pre-training row (repeated rows are encoded once)."""
    cache: dict[str, Sample] = {}
    samples: list[Sample] = []
    for row in rows:
        key = row["text"] if "text" in row else repr(row["messages"])
        if key not in cache:
            cache[key] = _encode_row(tokenizer, row, max_length)
        samples.append(cache[key])
    return samples


def _encode_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> Sample:
    if "text" in row:
        ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
        return ids, list(ids)
    encoded = tokenizer.apply_chat_template(
        row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(encoded["input_ids"])[:max_length]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, encoded["assistant_masks"], strict=False)]
    return ids, labels


def _collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(samples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def _batches(samples: Sequence[Sample], spec: DemoWorldSpec, generator: torch.Generator):
    """Endless stream of batches: a fresh seeded permutation every epoch, length-sorted in windows.

    Sorting within a window of ``pretrain_sort_window`` batches groups short dialogues apart from long
    documents, so little compute is spent on padding, while batch order stays random.
    """
    size, window = spec.pretrain_batch_size, spec.pretrain_batch_size * spec.pretrain_sort_window
    while True:
        order = torch.randperm(len(samples), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(samples[i][0]))
            batches += [chunk[i : i + size] for i in range(0, len(chunk) - size + 1, size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield [samples[i] for i in batches[b]]


def pretrain_model(
    spec: DemoWorldSpec, tokenizer: Any, samples: Sequence[Sample], log: Callable[[str], None]
) -> LlamaForCausalLM:
    """Initialise the tiny Llama from ``spec.seed`` and train it on ``samples``.

    Returns:
        The trained model in eval mode (float32, CPU).
    """
    if len(samples) < spec.pretrain_batch_size:
        raise ValueError(f"{len(samples)} pre-training rows cannot fill a batch of {spec.pretrain_batch_size}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(spec.pretrain_threads)
    try:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(model_config(spec, tokenizer)).float()
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=spec.pretrain_lr, weight_decay=spec.pretrain_weight_decay, betas=(0.9, 0.98)
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, spec.pretrain_warmup_steps, spec.pretrain_steps)
        generator = torch.Generator().manual_seed(spec.seed)
        batches = _batches(samples, spec, generator)
        started, running = time.monotonic(), math.nan
        for step in range(1, spec.pretrain_steps + 1):
            loss = model(**_collate(next(batches), tokenizer.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.pretrain_grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running = loss.item() if math.isnan(running) else 0.9 * running + 0.1 * loss.item()
            if step % max(1, spec.pretrain_steps // 10) == 0 or step == spec.pretrain_steps:
                log(f"demo world: pre-training step {step}/{spec.pretrain_steps} loss {running:.3f} "
                    f"({time.monotonic() - started:.0f}s)")
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval()
