"""Every knob of the demo world, in one validated, hashable spec.

The world on disk is a pure function of this spec (plus ``FORMAT_VERSION``), so the spec hash is its
cache key: change any field, or the code's output format, and a new world is built beside the old one.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Bump whenever the builder's output changes for an unchanged spec (new skill, template, file layout),
#: so stale cached worlds are never reused.
FORMAT_VERSION = 1


class DemoWorldSpec(BaseModel):
    """Sizes, model dimensions and pre-training settings of the offline demo world.

    Defaults are the real demo: a tiny Llama (0.9M parameters), pre-trained in about three and a half minutes on
    2 CPU cores, that knows the regression skills (capitals, opposites, copying, Vornish translation) and not the
    task (word-by-word translation into the fictional Zerbic language), which a LoRA adapter learns in a few hundred
    steps.

    Measured on 2 cores: at 3,000 pre-training steps the base scored 91 % on regression and the demo candidate
    plateaued at 73 % on the task (position slips inside sequences); at 4,000 steps the base scores 100 % and the
    candidate 100 %, so 4,000 is the default.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed of every random choice: names, rows, weights, data order.")

    # --- the fictional world ---------------------------------------------------------------------
    n_countries: int = Field(48, ge=2, le=200, description="Fictional countries, each with a capital city.")
    lexicon_size: int = Field(24, ge=2, le=32, description="English words that have a Zerbic translation.")
    min_words: int = Field(1, ge=1, description="Fewest words in a copy or translation sequence.")
    max_words: int = Field(4, ge=1, le=8, description="Most words in a copy or translation sequence.")
    prose_sentences: int = Field(4, ge=1, le=12, description="Sentences per general-text document.")

    # --- rows written to disk --------------------------------------------------------------------
    n_train_rows: int = Field(3000, ge=1, description="Task (translation) rows for fine-tuning, before replay rows.")
    task_replay_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Share of the task training set that replays base-skill dialogues "
        "(guards against forgetting; never regression prompts).")
    n_eval_rows: int = Field(300, ge=1, description="Held-out task rows: word combinations never in train.")
    n_regression_copy_rows: int = Field(80, ge=0, description="Held-out copy prompts in regression_qa.")
    n_regression_translate_rows: int = Field(80, ge=0, description="Held-out Vornish translations in regression_qa.")
    n_regression_text_rows: int = Field(200, ge=0, description="Held-out general-text documents.")

    # --- pre-training corpus ---------------------------------------------------------------------
    fact_repeats: int = Field(24, ge=1, description="Times each known fact dialogue occurs in pre-training.")
    n_pretrain_copy_rows: int = Field(6000, ge=0, description="Copy dialogues in the pre-training corpus.")
    n_pretrain_translate_rows: int = Field(6000, ge=0, description="Vornish translation dialogues in pre-training.")
    n_pretrain_prose_rows: int = Field(3000, ge=0, description="General-text documents in pre-training.")

    # --- tokenizer -------------------------------------------------------------------------------
    vocab_size: int = Field(640, ge=300, description="BPE vocabulary size (bytes + specials + merges).")

    # --- model (Linear dims must be multiples of 64 for bitsandbytes 4-bit blocks) ---------------
    hidden_size: int = Field(128, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (head dim = hidden_size / num_heads).")
    num_kv_heads: int = Field(4, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(384, description="MLP width.")
    max_position_embeddings: int = Field(256, ge=32, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")

    # --- pre-training ----------------------------------------------------------------------------
    pretrain_steps: int = Field(4000, ge=1, description="Optimizer steps of base-model pre-training.")
    pretrain_batch_size: int = Field(32, ge=1, description="Sequences per pre-training step.")
    pretrain_lr: float = Field(5e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    pretrain_warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    pretrain_weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (keeps weights 4-bit friendly).")
    pretrain_grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    pretrain_sort_window: int = Field(32, ge=1, description="Batches per window sorted by length (less padding).")
    pretrain_threads: int = Field(2, ge=1, description="torch CPU threads while pre-training.")

    @model_validator(mode="after")
    def _consistent(self) -> DemoWorldSpec:
        if self.min_words > self.max_words:
            raise ValueError("min_words must be <= max_words")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        kv_width = self.hidden_size // self.num_heads * self.num_kv_heads
        for name, dim in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                          ("key/value width", kv_width)):
            if dim % 64:
                raise ValueError(f"{name}={dim} must be a multiple of 64 (bitsandbytes 4-bit blocks)")
        if self.pretrain_warmup_steps >= self.pretrain_steps:
            raise ValueError("pretrain_warmup_steps must be < pretrain_steps")
        return self

    def spec_hash(self) -> str:
        """First 16 hex chars of sha256 over the canonical JSON of the spec and ``FORMAT_VERSION``."""
        payload = {"format_version": FORMAT_VERSION, "spec": self.model_dump(mode="json")}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
