"""Packing (TRL best-fit, padding-free) must not let packed samples see each other.

TRL flattens a packed batch into one row whose ``position_ids`` restart at every sample; with flash
attention that selects variable-length kernels, and with SDPA/eager (CPU, most GPUs without flash-attn)
transformers must derive a block-diagonal mask from the position ids. This checks the latter on the
tiny model: the logits of each sample are the same packed or alone. transformers only looks for packed
sequences when there is no KV cache; TRL's ``SFTTrainer.compute_loss`` passes ``use_cache=False``, and
so does this test (with a cache, the second sample would see the first: measured max logit error 0.43).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def test_packed_samples_do_not_attend_to_each_other(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    first = torch.randint(10, model.config.vocab_size, (1, 7))
    second = torch.randint(10, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        alone = [model(input_ids=sample).logits for sample in (first, second)]
        packed = model(
            input_ids=torch.cat([first, second], dim=1),
            position_ids=torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0),
            use_cache=False,  # as SFTTrainer.compute_loss does
        ).logits
    torch.testing.assert_close(packed[:, :7], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone[1], rtol=1e-4, atol=1e-5)
