"""QLoRA training: a 4-bit frozen base, a PEFT LoRA adapter, TRL's SFTTrainer as the loop."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lora_pipeline.checkpoints import (
    DiskFullError,
    ManifestCallback,
    StopOnSignal,
    TrainingInterrupted,
    latest_valid_checkpoint,
)
from lora_pipeline.config import PipelineConfig
from lora_pipeline.modeling import detect_device, load_base_model, load_tokenizer, select_compute_dtype

logger = logging.getLogger(__name__)

MetricsSink = Callable[[Mapping[str, float], int], None]
#: What PEFT writes for an adapter (in the adapter dir and in every checkpoint).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter went and the small metric dict the flow passes on."""

    adapter_dir: Path
    metrics: dict[str, float]
    adapter_checksum: str = ""  # SHA-256 of this process's adapter weights (ranks must agree)


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors in name order (float32 bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_lora_config(cfg: PipelineConfig) -> PeftLoraConfig:
    """PEFT LoRA settings from ``lora.*`` (``all-linear`` adapts every linear layer but the LM head)."""
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora,
        modules_to_save=cfg.lora.modules_to_save,
        bias="none",
    )


def build_sft_config(
    cfg: PipelineConfig, checkpoint_dir: Path, compute_dtype: torch.dtype, device: torch.device,
    *, row_packing: bool = False,
) -> SFTConfig:
    """TRL arguments from the pipeline config. Mixed precision follows the chosen compute dtype.

    SFTConfig defaults bf16=True and gradient_checkpointing=True; both are set explicitly because bf16
    autocast on a CPU without bf16 units is ~100x slower. ``train.optim`` names the optimizer as
    transformers does; its bitsandbytes variants were checked to run here when the config was validated.
    """
    train = cfg.train
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
        data_seed=train.seed,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        logging_steps=train.logging_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device.type == "cpu",
        max_length=cfg.data.max_length,
        # Row packing (see ``uses_row_packing``) packs before the trainer sees the data; TRL's own
        # packing is the padding-free one, for flash-attention models.
        packing=train.packing and not row_packing,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        report_to=[],  # tracking goes through our own sink, to the pipeline's single MLflow run
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Every LoRA parameter takes part in every forward pass: skip DDP's unused-parameter search.
        ddp_find_unused_parameters=False,
        remove_unused_columns=True,
    )


def uses_row_packing(packing: bool, attn_implementation: str | None) -> bool:
    """Whether ``train.packing`` packs into padded *rows* rather than TRL's one padding-free row.

    TRL's best-fit packing flattens the whole batch into a single row with restarting position ids,
    which is made for flash-attention's variable-length kernels. Under SDPA or eager attention (every
    CPU, GPUs without flash-attn) transformers then builds a dense block mask over batch x length
    tokens, which made packing slower than no packing here (0.59x at batch 32). Row packing keeps
    ``batch`` rows of up to ``max_length`` tokens, so attention costs what an unpacked batch costs
    while the rows carry no padding.
    """
    return packing and not (attn_implementation or "").startswith("flash")


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Batches rows packed by ``trl.pack_dataset``: position ids restart at every packed sample.

    No attention mask is returned: without one, transformers derives a block-diagonal mask from
    the restarting position ids, so packed samples never attend to each other (tests/test_packing.py).
    The first token of every packed sample gets label -100, so no sample learns to predict the next
    sample's first token (as TRL's padding-free collator does).
    """

    def __init__(self, pad_token_id: int) -> None:
        super().__init__(pad_token_id=pad_token_id, return_position_ids=True)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def pack_rows(dataset: Dataset, max_length: int, seed: int) -> Dataset:
    """Shuffle, then best-fit pack tokenized samples into rows of at most ``max_length`` tokens."""
    shuffled = dataset.select_columns(["input_ids", "labels"]).shuffle(seed=seed)
    return pack_dataset(shuffled, max_length, strategy="bfd")


class _MetricsCallback(TrainerCallback):
    """Forwards the trainer's log dicts (loss, learning rate, grad norm) to a sink, on rank 0 only, and
    times the optimizer steps themselves (``step_seconds``: forward, backward and update, from each step's
    begin to its end; the loop's logging, checkpoint saves and batch fetching lie between steps)."""

    def __init__(self, sink: MetricsSink | None) -> None:
        self.sink = sink
        self.sink_failures = 0
        self.history: list[dict[str, float]] = []
        self._started: tuple[float, int] | None = None  # (time, step) when this session began
        self.step_seconds = 0.0
        self._step_began: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_began is not None:
            self.step_seconds += time.perf_counter() - self._step_began
            self._step_began = None
        if self._started is None:  # first step of this session (after a resume, not step 1)
            self._started = (time.perf_counter(), state.global_step)

    def _eta(self, state: Any) -> str:
        if self._started is None or state.global_step <= self._started[1]:
            return "?"
        per_step = (time.perf_counter() - self._started[0]) / (state.global_step - self._started[1])
        return f"{per_step * (state.max_steps - state.global_step):.0f}s"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        self.history.append({"step": state.global_step, **numeric})
        logger.info("step %d/%d (ETA %s) %s", state.global_step, state.max_steps, self._eta(state),
                    " ".join(f"{k}={v:.4g}" for k, v in numeric.items()))
        if self.sink is not None:
            try:
                self.sink(numeric, state.global_step)
            except Exception as exc:  # noqa: BLE001 - a tracking server's hiccup must never stop training
                self.sink_failures += 1
                logger.warning("metrics for step %d not logged (%s: %s); training goes on", state.global_step,
                               type(exc).__name__, exc)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as stored elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def upcast_trainable_params(model: torch.nn.Module) -> int:
    """Keep every trainable parameter (LoRA A/B, DoRA magnitude, modules_to_save) in float32.

    The rule: trainable weights are float32 master weights whatever the compute dtype; the frozen base
    stays in its own dtype and autocast (bf16/fp16 mixed precision) picks the matmul dtype. Why:

    - fp16: the GradScaler refuses fp16 master weights ("Attempting to unscale FP16 gradients").
    - bf16: bf16 master weights round away small Adam updates (why TRL keeps DoRA's magnitude out of its
      cast, trl#7268). Adapters are small, so float32 costs little (a large ``modules_to_save`` is not).
    - CPU: TRL casts a quantised model's trainable weights to bf16 (the QLoRA paper's recipe), which
      made every adapter matmul ~100x slower here than float32.

    This is also PEFT's own default (``get_peft_model(autocast_adapter_dtype=True)`` upcasts fp16/bf16
    adapters), which TRL undoes for quantised models; call this after ``SFTTrainer.__init__`` and before
    the optimizer is built (``trainer.train()``), so optimizer state and checkpoints are float32 too.

    Returns:
        How many parameter tensors were cast.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
            cast += 1
    return cast


LOSS_CURVE_FILENAME = "loss_curve.png"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_loss_curve(history: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """PNG of training loss (and learning rate) per step; None when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(*zip(*points, strict=True), color="tab:blue", label="loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    rates = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if rates:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(*zip(*rates, strict=True), color="tab:orange", alpha=0.6, label="learning rate")
        rate_axis.set_ylabel("learning rate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tokens_seen_at(checkpoint: Path | None) -> float:
    """``num_input_tokens_seen`` recorded in a checkpoint's trainer state (0 without a checkpoint)."""
    if checkpoint is None:
        return 0.0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return float(state.get("num_input_tokens_seen") or 0)


def train_qlora(
    cfg: PipelineConfig,
    tokenized_path: Path,
    run_dir: Path,
    metrics_sink: MetricsSink | None = None,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train a LoRA adapter on the (quantised) base and save it under ``run_dir/adapter``.

    Resumes from the newest intact checkpoint in ``checkpoint_dir`` (optimizer, scheduler, RNG and
    data position included); incomplete or corrupt newer ones are moved aside, never used.

    Args:
        cfg: resolved pipeline config (``model.name_or_path`` points at real weights).
        tokenized_path: JSONL of ``input_ids``/``labels`` from the format stage.
        run_dir: this run's directory (the adapter and the datasets cache go here).
        metrics_sink: called with each log dict and step (e.g. MLflow logging).
        checkpoint_dir: where checkpoints live; key it by config + data (the run key) so a retry or a
            re-run of the same training resumes and a changed one never does. Default
            ``run_dir/checkpoints``.
        callbacks: extra Trainer callbacks.

    Returns:
        The adapter directory and final metrics (loss, steps, seconds, tokens/s of this session,
        parameter counts, the step resumed from).
    """
    set_seed(cfg.train.seed)
    device = detect_device()
    compute_dtype = select_compute_dtype(cfg.quant.compute_dtype, device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, cfg.quant, device)
    dataset = Dataset.from_json(str(tokenized_path), cache_dir=str(run_dir / "hf_cache"))
    checkpoint_dir = checkpoint_dir or run_dir / "checkpoints"
    callback = _MetricsCallback(metrics_sink)
    stopper = StopOnSignal()
    row_packing = uses_row_packing(cfg.train.packing, getattr(model.config, "_attn_implementation", None))
    collator = None
    if row_packing:
        dataset = pack_rows(dataset, cfg.data.max_length, cfg.train.seed)
        collator = PackedRowsCollator(tokenizer.pad_token_id)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(cfg, checkpoint_dir, compute_dtype, device, row_packing=row_packing),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
        callbacks=[callback, ManifestCallback(), stopper, *callbacks],
    )
    upcast_trainable_params(trainer.model)
    trainable, total = count_parameters(trainer.model)
    resume = latest_valid_checkpoint(checkpoint_dir, set_aside=trainer.is_world_process_zero())
    resumed_from = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    if resume:
        logger.info("resuming from %s (step %d of %d)", resume, resumed_from, cfg.train.max_steps)
    adapter_dir = run_dir / "adapter"
    if resume is not None and resumed_from >= cfg.train.max_steps:
        # This run key already finished training (a re-run of the same config on the same data):
        # its final checkpoint *is* the adapter. (Trainer.train would run one extra step here.)
        logger.info("training already finished at step %d for this config and data: reusing %s", resumed_from, resume)
        if trainer.is_world_process_zero():
            adapter_dir.mkdir(parents=True, exist_ok=True)
            for name in ADAPTER_FILES:
                shutil.copy2(resume / name, adapter_dir / name)
            tokenizer.save_pretrained(str(adapter_dir))
        checksum = tensors_checksum(load_file(str(resume / ADAPTER_FILES[0])))
        history = json.loads((resume / "trainer_state.json").read_text())["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        train_loss, seconds, tokens, global_step = (sum(losses) / len(losses) if losses else 0.0), 0.0, 0.0, resumed_from
    else:
        # Read before training: save_total_limit may rotate the resumed-from checkpoint away meanwhile.
        tokens_before = _tokens_seen_at(resume)
        started = time.perf_counter()
        with stopper.installed():
            try:
                output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # The checkpoint being written has no manifest: the next run sets it aside and resumes from
                # the last intact one.
                raise DiskFullError(f"disk full while saving a checkpoint under {checkpoint_dir} "
                                    f"({shutil.disk_usage(checkpoint_dir).free >> 20} MB free) at step "
                                    f"{trainer.state.global_step}: earlier checkpoints are intact; free space and "
                                    "run again to resume") from exc
        seconds = time.perf_counter() - started
        if stopper.received is not None:  # the checkpoint is saved; an adapter of a cut-short run is not
            raise TrainingInterrupted(f"training stopped by SIGTERM at step {trainer.state.global_step} of "
                                      f"{cfg.train.max_steps}: checkpoint-{trainer.state.global_step} is saved in "
                                      f"{checkpoint_dir}; the next run of this training resumes there")
        trainer.save_model(str(adapter_dir))  # rank 0 only (Trainer.should_save)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(adapter_dir))
        checksum = tensors_checksum({n: p for n, p in trainer.model.named_parameters() if p.requires_grad})
        # The restored state already counts the resumed-from steps' tokens: rate this session's only.
        tokens = float(trainer.state.num_input_tokens_seen or 0) - tokens_before
        losses = [h["loss"] for h in callback.history if "loss" in h]
        train_loss, global_step = float(output.training_loss), trainer.state.global_step
    metrics = {
        "train_loss": float(train_loss),
        "final_loss": float(losses[-1]) if losses else float(train_loss),
        "global_step": float(global_step),
        "train_seconds": round(seconds, 2),
        "train_step_seconds": round(callback.step_seconds, 2),  # the loop's math (see _MetricsCallback)
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "trainable_params": float(trainable),
        "trainable_ratio": round(trainable / total, 6) if total else 0.0,
        "resumed_from_step": float(resumed_from),
        "train_sequences": float(len(trainer.train_dataset)),  # after packing: fewer than samples
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    if trainer.is_world_process_zero():
        write_loss_curve(callback.history, run_dir / "train" / LOSS_CURVE_FILENAME)
    return TrainResult(adapter_dir=adapter_dir, metrics=metrics, adapter_checksum=checksum)
