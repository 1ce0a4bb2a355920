"""A stand-in model for the serving tests: answers with a fixed token sequence, records its prompts and batches."""

from __future__ import annotations

import torch
from transformers import GenerationConfig


class ScriptedModel(torch.nn.Module):
    """Answers every row with a fixed token sequence; records each prompt (padding removed) and batch size."""

    def __init__(self, answer: list[int], eos_token_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = answer
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)
        self.prompts: list[list[int]] = []
        self.batch_sizes: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.batch_sizes.append(len(input_ids))
        self.prompts.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        answer = torch.tensor([self.answer[:max_new_tokens]]).expand(len(input_ids), -1)
        return torch.cat([input_ids, answer], dim=1)
