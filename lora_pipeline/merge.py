"""Merge a LoRA adapter into a de-quantised reload of its base, and prove the merge changed nothing.

Merging into 4-bit weights would round the LoRA delta away (PEFT's ``bnb.py`` warns of this), so the
base is reloaded, de-quantised to the compute dtype, and only then merged with ``safe_merge=True``
(which checks for NaN/inf). The merged model must reproduce base+adapter logits within a tolerance.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from lora_pipeline.build_once import COMPLETE_MARKER
from lora_pipeline.config import PipelineConfig
from lora_pipeline.modeling import detect_device, load_base_model, load_tokenizer


class MergeError(RuntimeError):
    """The merge was refused or its result does not match the adapter it came from."""


@dataclass(frozen=True)
class MergeReport:
    """Parity figures are relative: max |logit difference| / max |reference logit|."""

    merged_dir: Path
    merge_rel_diff: float  # merged vs the same de-quantised base + unmerged adapter: the merge itself
    quantized_rel_diff: float  # merged vs the 4-bit base + adapter that was trained and evaluated
    n_prompts: int
    dequantized: bool
    #: The merge's math: de-quantising the base, the three parity forward passes and merge_and_unload (not
    #: loading the models or saving the merged one).
    math_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def is_quantized(model: torch.nn.Module) -> bool:
    """True if any layer still holds bitsandbytes 4-bit or 8-bit weights."""
    return any(type(m).__name__ in {"Linear4bit", "Linear8bitLt"} for m in model.modules())


def merge_lora(peft_model: PeftModel) -> torch.nn.Module:
    """``merge_and_unload(safe_merge=True)``, refusing quantised targets and checking no LoRA layer is left.

    Raises:
        MergeError: the base is still quantised, or LoRA layers survived the merge.
    """
    if is_quantized(peft_model.get_base_model()):
        raise MergeError("refusing to merge into quantised weights: reload the base de-quantised first")
    merged = peft_model.merge_and_unload(safe_merge=True)
    if any(isinstance(m, LoraLayer) for m in merged.modules()):
        raise MergeError("LoRA layers remain after merge_and_unload")
    return merged


@torch.no_grad()
def _prompt_logits(model: Any, prompts: Sequence[list[int]]) -> torch.Tensor:
    """Logits at every position of every prompt, concatenated (prompts differ in length)."""
    device = next(model.parameters()).device
    return torch.cat([model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts])


def relative_diff(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| (NaN/inf propagate, so they fail any tolerance)."""
    if reference.numel() == 0:
        return 0.0
    return float((actual - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def _dequantized_base(cfg: PipelineConfig, device: torch.device) -> tuple[Any, bool, float]:
    """The base de-quantised to the compute dtype, whether it was quantised, and the seconds de-quantising took."""
    quantized = cfg.quant.quantizes
    model = load_base_model(cfg.model, cfg.quant, device)
    started = time.perf_counter()
    if quantized:
        # The same quantised weights the adapter was trained against, de-quantised to the compute dtype.
        # Always a fresh load: bitsandbytes 0.50's CPU kernel repacks 4-bit weights on their first forward
        # pass, after which dequantize() returns wrong weights (relative logit difference 1.35 on SmolLM2).
        model = model.dequantize()
    return model, quantized, time.perf_counter() - started


def save_dequantized_base(cfg: PipelineConfig, out_dir: Path) -> None:
    """Save the quantised base an adapter was trained against, de-quantised to the compute dtype, as a plain
    model directory (weights, tokenizer, generation config) ending with the ``COMPLETE`` marker.

    This is the base of adapter-form versions trained on a quantised base: a QLoRA adapter is right on
    the weights it was trained on, not on the original full-precision ones (on SmolLM2 its task exact
    match falls from 97.5 % to 52.5 % there). These are the weights the merge merges into.
    """
    model, _, _ = _dequantized_base(cfg, detect_device())
    _drop_quantization_config(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(out_dir))
    (out_dir / COMPLETE_MARKER).write_text(json.dumps({"base": cfg.model.name_or_path,
                                                       "quant": cfg.quant.model_dump(mode="json")}))


def _drop_quantization_config(model: Any) -> None:
    # A quantisation config would make loaders try to re-quantise already de-quantised weights.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def merge_adapter(
    cfg: PipelineConfig,
    adapter_dir: Path,
    out_dir: Path,
    prompts: Sequence[list[int]],
    stop_ids: Sequence[int],
) -> MergeReport:
    """Merge ``adapter_dir`` into the base and save a standalone model (safetensors) in ``out_dir``.

    Two parity checks on ``prompts`` (token ids): the merged model against the same de-quantised base
    with the adapter unmerged (the merge must be exact: ``merge.parity_tolerance``), and against the
    4-bit base + adapter that was evaluated (``merge.quantized_parity_tolerance``; bitsandbytes' 4-bit
    inference kernels differ from exact de-quantisation: ~0.5 % on the demo model, ~4 % on a 30-layer one).

    The merged model's ``generation_config.eos_token_id`` is the whole stop set ``stop_ids`` (a list:
    Llama 3 stops on three ids; overwriting it with the tokenizer's one EOS would make it ramble on).

    Raises:
        MergeError: a parity check fails or the merge is refused; nothing is written then.
    """
    device = detect_device()
    tokenizer = load_tokenizer(cfg.model, adapter_dir)
    evaluated = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quant, device), str(adapter_dir))
    started = time.perf_counter()
    evaluated_logits = _prompt_logits(evaluated.eval(), prompts)
    math_seconds = time.perf_counter() - started
    del evaluated
    base, dequantized, dequantize_seconds = _dequantized_base(cfg, device)
    unmerged = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    started = time.perf_counter()
    unmerged_logits = _prompt_logits(unmerged, prompts)
    merged = merge_lora(unmerged)
    merged_logits = _prompt_logits(merged.eval(), prompts)
    math_seconds += dequantize_seconds + time.perf_counter() - started
    report = MergeReport(
        merged_dir=out_dir,
        merge_rel_diff=relative_diff(merged_logits, unmerged_logits),
        quantized_rel_diff=relative_diff(merged_logits, evaluated_logits),
        n_prompts=len(prompts),
        dequantized=dequantized,
        math_seconds=round(math_seconds, 3),
    )
    for name, value, limit in (("merge.parity_tolerance", report.merge_rel_diff, cfg.merge.parity_tolerance),
                               ("merge.quantized_parity_tolerance", report.quantized_rel_diff,
                                cfg.merge.quantized_parity_tolerance)):
        if not value <= limit:  # also catches NaN
            raise MergeError(f"merged logits differ by {value:.3g} (relative) > {name}={limit}")
    _save_merged(merged, tokenizer, out_dir, stop_ids)
    (out_dir / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _save_merged(model: Any, tokenizer: Any, out_dir: Path, stop_ids: Sequence[int]) -> None:
    _drop_quantization_config(model)
    model.generation_config.eos_token_id = list(stop_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # Written beside the target, then renamed: a save cut short (a full disk) never leaves a merged directory
    # that looks complete, so nothing can register it.
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(str(partial), safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(partial))
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise MergeError(f"disk full while writing the merged model to {out_dir} "
                             f"({shutil.disk_usage(out_dir.parent).free >> 20} MB free): nothing was written; free "
                             "space and retry") from exc
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
