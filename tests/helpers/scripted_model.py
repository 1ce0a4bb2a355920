"""A stand-in model for the serving tests: answers with a fixed token sequence, records its prompts."""

from __future__ import annotations

import torch
from transformers import GenerationConfig


class ScriptedModel(torch.nn.Module):
    """Answers with a fixed token sequence and records the prompts it was given."""

    def __init__(self, answer: list[int], eos_token_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = answer
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([self.answer[:max_new_tokens]])], dim=1)
