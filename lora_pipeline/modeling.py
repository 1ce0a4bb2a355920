"""Loading base models and tokenizers: device, compute dtype and quantisation chosen in one place."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lora_pipeline.chat_templates import apply_named_template
from lora_pipeline.config import ModelConfig, QuantConfig

logger = logging.getLogger(__name__)


def detect_device() -> torch.device:
    """The device this process trains and evaluates on: its own CUDA device if there is one, else the CPU.

    Under torchrun/accelerate every rank owns the GPU at index ``LOCAL_RANK`` (modulo the visible GPUs,
    as accelerate maps it, so a launcher that shows each rank only its own GPU gets cuda:0). The current
    CUDA device is not a substitute: it is cuda:0 on every rank until accelerate sets it, which happens
    only when the trainer's arguments are built, after the base model was loaded. Without LOCAL_RANK
    (one process) the current device is used.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", int(local_rank) % torch.cuda.device_count())


def select_compute_dtype(requested: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """Pick the matmul dtype for ``quant.compute_dtype``.

    ``auto`` gives bfloat16 only on GPUs with native bf16 units (compute capability >= 8, Ampere on; ROCm),
    float16 on older GPUs and float32 on CPUs. Pre-Ampere GPUs only *emulate* bf16 (no tensor-core path,
    while their fp16 runs on tensor cores), yet ``torch.cuda.is_bf16_supported()`` counts emulation as
    support by default, hence ``including_emulation=False``. CPU bf16 matmul without AVX-512-bf16 is
    ~100x slower than float32 (measured 1.3 vs 120 GFLOP/s on this machine).

    The probe reads the *current* CUDA device (cuda:0 on every rank before accelerate sets it): ranks
    must agree on one dtype anyway, so a node mixing GPU generations needs an explicit compute_dtype.

    Args:
        requested: "auto" or an explicit dtype name.
        device: where the model runs.
        bf16_supported: override for the GPU capability probe (tests).
    """
    if requested != "auto":
        dtype = getattr(torch, requested)
        if device.type == "cpu" and dtype != torch.float32:
            logger.warning("quant.compute_dtype=%s on CPU is much slower than float32", requested)
        return dtype
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_supported else torch.float16


def quantization_config(quant: QuantConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for ``quant``, or None for a full-precision base (plain LoRA)."""
    if quant.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=getattr(torch, quant.quant_storage),
        )
    if quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(model_cfg: ModelConfig, source: str | Path | None = None) -> Any:
    """Tokenizer of the base model (or of ``source``, e.g. a merged model dir), padded on the left.

    For the base model, ``model.chat_template`` (unless "tokenizer") replaces the tokenizer's own
    template; a ``source`` dir keeps the template it was saved with, which is that same one. A missing
    pad token is filled in by :func:`ensure_pad_token`. Left padding lets batched generation continue
    every prompt from its last real token; training pads through the collator and is unaffected.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        str(source or model_cfg.name_or_path),
        revision=None if source else model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if source is None and model_cfg.chat_template != "tokenizer":
        apply_named_template(tokenizer, model_cfg.chat_template)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one of its existing tokens; never add a token.

    Adding a token would resize the embeddings of a 4-bit base. UNK is preferred (byte-level and
    byte-fallback vocabularies rarely, if ever, produce it from real text); otherwise EOS. Padding with
    EOS is the classic way to never learn to stop when a collator masks labels *by pad id*; here labels
    are precomputed by the formatter and the collator pads them with -100 *by position*, so every real
    EOS stays trained.
    """
    if tokenizer.pad_token is not None or tokenizer.eos_token is None:
        return  # no EOS: formatting.check_tokenizer refuses the tokenizer with a clear message
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        logger.info("tokenizer has no pad token: padding with its unk token %r", tokenizer.unk_token)
        return
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning(
        "tokenizer has no pad token: padding with EOS %r. Safe here because labels are precomputed and padded "
        "with -100 by position, so EOS stays trained; a distinct pad token is still preferable.",
        tokenizer.eos_token,
    )


class RemoteCodeRefused(RuntimeError):
    """A model ships its own code (``auto_map`` in its config) and running it was not allowed."""


def refuse_unreviewed_remote_code(source: str | Path, trust_remote_code: bool, revision: str | None = None,
                                  auto_map: Any = None) -> None:
    """Refuse a model whose config names its own code (``auto_map``) unless that code is trusted.

    Told not to trust remote code, transformers quietly loads its built-in class instead when the
    model type is a known one (``llama`` with an ``auto_map``): a different model from the one its
    author meant, without a word. Here that is an error instead, so it is a decision: set
    ``model.trust_remote_code`` (the config then requires ``model.revision`` to be a full commit).

    Args:
        source: Model directory or hub id.
        trust_remote_code: ``model.trust_remote_code``.
        revision: Hub revision of a hub id.
        auto_map: The ``auto_map`` of an already loaded config; None reads the config file when it is
            on this machine (a local directory, or the hub cache), never from the network: no code
            runs, and a model not here yet is checked once loaded.

    Raises:
        RemoteCodeRefused: the config has an ``auto_map`` and ``trust_remote_code`` is False.
    """
    if trust_remote_code:
        return
    if auto_map is None:
        from transformers import PretrainedConfig

        try:
            auto_map = PretrainedConfig.get_config_dict(str(source), revision=revision,
                                                        local_files_only=True)[0].get("auto_map")
        except OSError:
            return
    if auto_map:
        raise RemoteCodeRefused(
            f"{source} ships its own model code (auto_map: {sorted(auto_map)}); it runs only with "
            "model.trust_remote_code=true and model.revision set to the full 40-character commit that was reviewed")


def load_base_model(
    model_cfg: ModelConfig, quant: QuantConfig, device: torch.device, *, quantize: bool = True
) -> Any:
    """Load the causal LM from ``model.name_or_path`` (local dir or hub id), safetensors only.

    Args:
        model_cfg: where the weights are, revision and remote-code policy.
        quant: 4-bit / 8-bit / none, and the compute dtype.
        device: target device (this rank's own GPU, see :func:`detect_device`); a quantised base is
            loaded straight onto it through ``device_map``, as bitsandbytes quantises while loading.
        quantize: False loads the full-precision base even when ``quant`` asks for 4-bit (the
            reference a user would otherwise serve).
    """
    refuse_unreviewed_remote_code(model_cfg.name_or_path, model_cfg.trust_remote_code, model_cfg.revision)
    compute_dtype = select_compute_dtype(quant.compute_dtype, device)
    bnb = quantization_config(quant, compute_dtype) if quantize else None
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        dtype=compute_dtype,
        quantization_config=bnb,
        device_map={"": device} if bnb is not None else None,
    )
    # A hub model that was not cached before this load is checked now (nothing of its code ran: not trusted).
    refuse_unreviewed_remote_code(model_cfg.name_or_path, model_cfg.trust_remote_code,
                                  auto_map=getattr(getattr(model, "config", None), "auto_map", None))
    if bnb is None:
        model.to(device)
    model.eval()
    return model
