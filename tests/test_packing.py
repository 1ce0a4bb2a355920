"""Packing must not let packed samples see each other, and must train exactly the unpacked targets.

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


def test_row_packing_unless_flash_attention():
    from lora_pipeline.training import uses_row_packing

    assert uses_row_packing(True, "sdpa") and uses_row_packing(True, "eager")
    assert not uses_row_packing(True, "flash_attention_2")  # TRL's padding-free varlen path
    assert not uses_row_packing(False, "sdpa")


def _token_losses(model, input_ids, labels, position_ids=None):
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none",
                                               ignore_index=-100)
    return losses[targets.flatten() != -100]


def test_packed_rows_train_exactly_the_unpacked_targets(tiny_model_dir, tiny_rows_path, tmp_path):
    """Row-packed batches give every sample the same (context -> target) losses as training it alone."""
    from datasets import Dataset

    from lora_pipeline.config import ModelConfig
    from lora_pipeline.formatting import format_dataset
    from lora_pipeline.modeling import load_tokenizer
    from lora_pipeline.training import PackedRowsCollator, pack_rows

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenized = tmp_path / "tokenized.jsonl"
    format_dataset(tokenizer, tiny_rows_path, tokenized, 64)
    samples = Dataset.from_json(str(tokenized))
    packed = pack_rows(samples, 64, seed=0)
    assert len(packed) < len(samples)
    batch = PackedRowsCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch  # else transformers would not separate the samples
    assert batch["input_ids"].shape == (len(packed), max(len(row) for row in packed["input_ids"]))
    assert batch["input_ids"].shape[1] <= 64

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        packed_losses = _token_losses(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        alone = [_token_losses(model, torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]]))
                 for row in samples]
    alone_losses = torch.cat(alone)
    assert packed_losses.numel() == alone_losses.numel() > 0
    # Same multiset of per-target losses (packing reorders samples): compare sorted.
    torch.testing.assert_close(packed_losses.sort().values, alone_losses.sort().values, rtol=1e-4, atol=1e-5)
