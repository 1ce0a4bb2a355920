"""One typed configuration tree for the whole pipeline.

Loaded from YAML, overridden with ``--set a.b=c`` and validated once at start. Sub-configs are passed
down explicitly to the library functions; nothing reads an untyped dict with defaults.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

# The sections live in three modules; everything is imported from here (one import path for callers).
from lora_pipeline.config_base import MODEL_NAME_PATTERN, ConfigError, Strict, no_path_tricks  # noqa: F401
from lora_pipeline.config_operations import MlflowConfig, NotifyConfig, RegistryConfig, SecretsConfig
from lora_pipeline.demo_world import DemoWorldSpec


#: Sentinel for ``model.name_or_path`` / ``data.path`` / ``data.eval_path`` / ``eval.regression_*``:
#: the embedded offline demo world (tokenizer, tiny base model and datasets built on first use).
BUILTIN_DEMO = "builtin:demo"
#: ``eval.regression_*`` default: the demo's suites for ``builtin:demo``, else the package's general sets.
AUTO = "auto"
#: ``eval.regression_qa_path``: the base model's own answers to the package's general prompts are the references.
BASE_ANSWERS = "base_answers"


class ModelConfig(Strict):
    name_or_path: str = Field(BUILTIN_DEMO, description="Local model dir, hub id, or builtin:demo.")
    revision: str | None = Field(None, description="Hub revision (commit/tag) to pin.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code (needs model.revision to be a "
                                    "full 40-hex commit).")
    chat_template: Literal["tokenizer", "chatml", "llama3", "alpaca"] = Field(
        "tokenizer",
        description="Prompt format: tokenizer = keep the tokenizer's own template; or a named template from "
        "lora_pipeline.chat_templates (installed on the base tokenizer, saved with the adapter and merged model).",
    )

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> ModelConfig:
        # A branch or tag can move after review; only a full commit hash pins the code that will run.
        if self.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.revision or ""):
            raise ValueError("model.trust_remote_code=true requires model.revision to be a full 40-character commit "
                             f"hash (the reviewed code), got {self.revision!r}")
        return self


class DataConfig(Strict):
    path: str | None = Field(
        None, description="Training data: file, dataset dir, hub name or builtin:demo. Unset: builtin:demo with the "
        "builtin:demo model, an error with any other (the demo's rows never train a real model by accident).")
    format: Literal["messages", "alpaca", "sharegpt", "prompt_completion", "text"] = Field(
        "messages", description="Row schema of the source; normalised to chat messages."
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _plain_paths(cls, value: str | None, info: Any) -> str | None:
        return no_path_tricks(value, f"data.{info.field_name}")
    eval_path: str | None = Field(
        None, description="Held-out task rows (same format as data.path). Unset: a deterministic held-out split of "
        "data.path (data.eval_fraction), kept out of training; with data.path=builtin:demo, the demo's own eval rows.")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="With data.eval_path unset: the share of data.path's rows held out for "
        "evaluation, chosen by a hash of each row's prompt (the same prompt never lands on both sides).")
    max_length: int = Field(128, gt=8, description="Token budget per templated sample (truncation length).")
    min_rows: int = Field(10, ge=1, description="Fewest clean rows a run may train on.")
    max_reject_fraction: float = Field(0.2, ge=0.0, le=1.0, description="Fail if more rows are quarantined.")
    max_truncated_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fail if more clean rows exceed data.max_length (a truncated answer loses "
        "its EOS, which teaches the model not to stop).")


class LoraConfig(Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): magnitude + direction.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens]).")

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module (or be 'all-linear')")
        return self


class QuantConfig(Strict):
    load_in_4bit: bool = Field(True, description="Load the frozen base in 4-bit (QLoRA).")
    load_in_8bit: bool = Field(False, description="Load the frozen base in 8-bit instead.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of packed 4-bit weights; FSDP + QLoRA needs it equal to the compute "
        "dtype (e.g. bfloat16) to shard them.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Matmul dtype; auto = bf16 on GPUs with native bf16 (Ampere on), fp16 on older GPUs "
        "(they only emulate bf16), fp32 on CPU.")

    @property
    def quantizes(self) -> bool:
        """Whether the frozen base is quantised (4-bit or 8-bit) rather than full precision."""
        return self.load_in_4bit or self.load_in_8bit

    @model_validator(mode="after")
    def _one_quantisation(self) -> QuantConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("quant.load_in_4bit and quant.load_in_8bit cannot both be true")
        return self


#: ``train.optim`` values, named as transformers' ``TrainingArguments.optim`` names them.
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


def optimizer_unsupported(name: str) -> str | None:
    """Why ``train.optim=name`` cannot run on this machine, or None when it can.

    Checked against bitsandbytes 0.50.2 (pinned in pyproject.toml): its 8-bit and paged AdamW also step
    CPU tensors, the paged ones falling back to ordinary, unpaged state there (same updates, and a
    warning from bitsandbytes), so a GPU config runs unchanged on a CPU machine. What cannot run is a
    bitsandbytes optimizer without bitsandbytes. The probe only looks the package up: importing it
    costs ~1-2 s and it probes for optional kernels, too much for validating a config.
    """
    if name.startswith("adamw_torch"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs the bitsandbytes package, which is not installed; install it or use adamw_torch_fused"
    return None


class TrainConfig(Strict):
    max_steps: int = Field(120, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate.")
    per_device_batch_size: int = Field(16, gt=0, description="Samples per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: Optimizer = Field(
        "adamw_torch_fused", description="Optimizer. adamw_torch_fused (transformers' default) / adamw_torch: "
        "torch AdamW; adamw_bnb_8bit: bitsandbytes AdamW with 8-bit states; paged_adamw_8bit / paged_adamw_32bit: "
        "the QLoRA paper's paged optimizers, whose states live in CUDA unified memory and page out to CPU RAM in "
        "memory spikes instead of running out of GPU memory (on a CPU they run unpaged).")
    num_processes: int = Field(1, ge=1, description="Data-parallel processes; > 1 launches torchrun (or accelerate).")
    accelerate_config: str | None = Field(
        None, description="With num_processes > 1: launch with `accelerate launch --config_file` this file (DDP, "
        "FSDP; see infra/accelerate/) instead of torchrun.")
    num_machines: int = Field(
        1, ge=1, description="Machines the training spans, each running num_processes ranks (world size = "
        "num_machines x num_processes). > 1: this machine (machine 0) launches torchrun with c10d rendezvous at "
        "rdzv_endpoint and the others join with `python -m lora_pipeline.distributed join`; every machine must see "
        "output_dir at the same path (shared storage). A machine's rank comes from its environment, not this file.")
    rdzv_endpoint: str | None = Field(
        None, description="With num_machines > 1 (required then): host:port of the c10d rendezvous, on the machine "
        "that runs the pipeline's train stage and reachable from every other one (e.g. pod 0's DNS name). A location: "
        "not part of the run key.")
    seed: int = Field(0, description="Seed for data order, LoRA init and dropout.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(
        2, ge=2, description="Checkpoints kept per run key (at least 2, so a corrupt newest one has a fallback); "
        "null keeps all.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N optimizer steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    packing: bool = Field(False, description="Pack several samples per sequence (TRL best-fit, no cross-attention "
                          "between them): fewer pad tokens on variable-length data.")
    group_by_length: bool = Field(False, description="Batch samples of similar length together (transformers' "
                                  "length-grouped sampler, still shuffled between groups): less padding without "
                                  "packing, for models or attention kernels that cannot pack.")

    @field_validator("optim")
    @classmethod
    def _optimizer_runs_here(cls, optim: str) -> str:
        reason = optimizer_unsupported(optim)
        if reason is not None:
            raise ValueError(f"train.optim={optim} {reason}")
        return optim

    @property
    def distributed(self) -> bool:
        """Whether training runs as launched processes (several per machine, or several machines)."""
        return self.num_processes > 1 or self.num_machines > 1

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"train.rdzv_endpoint must be host:port (e.g. trainer-0.trainer:29400), got {endpoint!r}")
        return endpoint

    @model_validator(mode="after")
    def _endpoint_for_machines(self) -> TrainConfig:
        if self.num_machines > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"train.num_machines={self.num_machines} needs train.rdzv_endpoint (host:port of the "
                             "rendezvous on the machine that runs the train stage)")
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps})"
            )
        return self


class EvalConfig(Strict):
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per prompt.")
    max_samples: int = Field(200, gt=0, description="Held-out rows scored per suite.")
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    regression_qa_path: str | None = Field(
        AUTO, validation_alias=AliasChoices("regression_qa_path", "regression_qa"),
        description="Q/A the base already answers: a file (messages, alpaca, ... detected per row); "
        f"`{BASE_ANSWERS}`: the base model's own greedy answers to a general prompt set shipped with the package "
        "become the references, so regression exact match measures drift from the base (1.0 for the base by "
        f"construction); `{AUTO}`: the demo's suite for builtin:demo, else {BASE_ANSWERS}; null: none.")
    regression_text_path: str | None = Field(
        AUTO, validation_alias=AliasChoices("regression_text_path", "regression_text"),
        description=f"General text for perplexity (JSONL of text rows); `{AUTO}`: the demo's for builtin:demo, "
        "else a general text set shipped with the package; null: none.")
    match: Literal["exact", "normalized"] = Field(
        "exact", description="How answers are compared for exact match: exact (whitespace collapsed) or "
        "normalized (also case, punctuation and articles ignored, as in SQuAD), for free-form answers.")
    full_precision_base: bool = Field(
        True, description="Also score the full-precision base: the gate compares against the quantised base the "
        "candidate was trained on, and the difference to this one is reported as the quantisation cost.")
    suites: list[str] = Field(
        ["task", "regression"], description="Suites to score: `task` (held-out task rows), `regression` (the "
        "base's skills and general text), and optional `lm_eval:<task>` lm-evaluation-harness tasks (skipped with "
        "a message when the package or the task's data is unavailable).")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        unknown = [s for s in suites if s not in ("task", "regression") and not
                   (s.startswith("lm_eval:") and len(s) > len("lm_eval:"))]
        if unknown:
            raise ValueError(f"unknown eval suites {unknown}: use task, regression or lm_eval:<task name>")
        return suites


class GateConfig(Strict):
    task_metric: Literal["exact_match", "token_f1", "rouge_l", "perplexity"] | None = Field(
        None, description="Task metric the gain is measured on: exact_match, token_f1 or rouge_l (candidate minus "
        "base), or perplexity (relative reduction 1 - candidate/base); unset: perplexity for data.format=text, "
        "else exact_match.")
    min_task_gain: float = Field(0.2, description="Least task gain of the candidate over the base (see task_metric).")
    regression_metric: Literal["exact_match", "token_f1", "rouge_l", "perplexity"] = Field(
        "exact_match", description="Regression metric the drop is measured on: exact_match, token_f1 or rouge_l of "
        "the regression Q/A (base minus candidate), or perplexity of the regression text (relative increase "
        "candidate/base - 1). With base_answers references, exact match of long free-form answers is brittle "
        "(quantisation alone changes most of them): rouge_l or perplexity measure drift more robustly.")
    max_regression: float = Field(0.1, ge=0.0, description="Largest allowed regression drop (see regression_metric).")
    min_stop_rate: float = Field(0.9, ge=0.0, le=1.0, description="Least fraction of candidate generations that "
                                 "end with EOS within eval.max_new_tokens, in every suite.")
    champion_tolerance: float = Field(0.0, ge=0.0, description="How far below the current champion's task and "
                                      "regression exact match a candidate may be and still pass.")


class MergeConfig(Strict):
    parity_tolerance: float = Field(
        1e-4, gt=0, description="Max relative logit difference, merged vs the same base with the adapter unmerged."
    )
    quantized_parity_tolerance: float = Field(
        5e-2, gt=0, description="Max relative logit difference, merged vs the 4-bit base + adapter as evaluated. "
        "bitsandbytes' 4-bit kernels differ from exact de-quantisation (on CPU they compute in bfloat16): measured "
        "0.005 on the 4-layer demo model and 0.038 on the 30-layer SmolLM2-135M; a broken merge is off by ~1.")
    parity_samples: int = Field(8, gt=0, description="Held-out prompts used for the parity check.")


class PipelineConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    merge: MergeConfig = MergeConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    notify: NotifyConfig = NotifyConfig()
    secrets: SecretsConfig = SecretsConfig()
    demo: DemoWorldSpec = DemoWorldSpec()
    output_dir: Path = Field(Path("outputs"), description="Root of all runs; made absolute at load time.")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _plain_output_dir(cls, value: Any) -> Any:
        return no_path_tricks(value, "output_dir") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _data_for_the_model(self) -> PipelineConfig:
        if self.data.path is None:
            if self.model.name_or_path != BUILTIN_DEMO:
                raise ValueError(f"data.path is required: model.name_or_path={self.model.name_or_path} is not the demo "
                                 f"model, so the demo's rows ({BUILTIN_DEMO}) are not its training data")
            self.data.path = BUILTIN_DEMO
        return self

    def config_hash(self) -> str:
        """Stable hash of every setting (part of the run key for resume and idempotent registration)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def run_key(self, data_hash: str, base_fingerprint: str) -> str:
        """Key of one training job: everything that changes the trained adapter, and nothing else.

        Checkpoints resume, and registration deduplicates, by it. It hashes the base weights' identity
        (``base_fingerprint``: weights hash, or hub id + resolved commit), the clean data's hash, the
        ``model``, ``data``, ``lora``, ``quant`` and ``train`` sections (without the *locations* of the
        model and data, which the two hashes stand for, and of the rendezvous endpoint) and the versions of
        the training libraries. So changing ``gate``, ``eval``, ``registry``, ``mlflow``, ``merge`` or
        ``output_dir`` reuses the trained adapter; moving the same data or weights elsewhere, or the same
        multi-machine training to another cluster address, does too.
        """
        sections = self.model_dump(mode="json", include=set(RUN_KEY_SECTIONS))
        for section, key in _LOCATION_KEYS:
            sections[section].pop(key, None)
        identity = {"base": base_fingerprint, "data": data_hash, "config": sections, "libraries": _library_versions()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


#: Config sections that change what training produces (see :meth:`PipelineConfig.run_key`).
RUN_KEY_SECTIONS = ("model", "data", "lora", "quant", "train")
#: Where things are, not what they are: the same training elsewhere keeps its run key.
_LOCATION_KEYS = (("model", "name_or_path"), ("data", "path"), ("data", "eval_path"), ("train", "rdzv_endpoint"))
#: Libraries whose version can change the trained adapter.
TRAINING_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes")


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in TRAINING_LIBRARIES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions
