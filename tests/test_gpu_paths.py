"""GPU-only decisions, checked on a CPU machine by mocking ``torch.cuda`` and the launcher's environment.

Each rank loads its base onto its own GPU; ``auto`` picks bf16 only where it is native; trainable weights
stay float32 under fp16/bf16 autocast; ``train.optim`` is validated up front and reaches the trainer.
"""

import inspect
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer
from trl import SFTConfig

from lora_pipeline import modeling
from lora_pipeline.config import ConfigError, ModelConfig, QuantConfig
from lora_pipeline.config_files import load_config
from lora_pipeline.modeling import detect_device, load_base_model, select_compute_dtype
from lora_pipeline.training import build_sft_config, upcast_trainable_params

CPU = torch.device("cpu")
BNB_OPTIMIZERS = ["adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


@pytest.fixture
def cuda_node(monkeypatch):
    """A machine that reports CUDA, with cuda:0 current (as on every rank before accelerate sets it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.mark.parametrize(("local_rank", "visible_gpus", "index"), [
    (None, 2, 0),  # one process: the current device
    ("1", 2, 1),
    ("1", 1, 0),  # the launcher shows each rank only its own GPU
])
def test_each_rank_trains_on_its_local_rank_gpu(cuda_node, monkeypatch, local_rank, visible_gpus, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert detect_device() == torch.device("cuda", index)


def test_cpu_ranks_stay_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect_device() == CPU


class _LoadedModel:
    moved_to: torch.device | None = None

    def to(self, device: torch.device) -> "_LoadedModel":
        self.moved_to = device
        return self

    def eval(self) -> "_LoadedModel":
        return self


@pytest.mark.parametrize("quantize", [True, False])
def test_rank_one_loads_its_base_onto_cuda_1(cuda_node, monkeypatch, quantize):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    calls: list[dict] = []
    fake_auto = SimpleNamespace(from_pretrained=lambda name, **kwargs: calls.append(kwargs) or _LoadedModel())
    monkeypatch.setattr(modeling, "AutoModelForCausalLM", fake_auto)

    model = load_base_model(ModelConfig(name_or_path="org/base"), QuantConfig(), detect_device(), quantize=quantize)

    (kwargs,) = calls
    assert kwargs["dtype"] == torch.bfloat16
    if quantize:  # bitsandbytes quantises while loading, straight onto this rank's GPU
        assert kwargs["device_map"] == {"": torch.device("cuda", 1)}
        assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
        assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
        assert model.moved_to is None
    else:
        assert kwargs["device_map"] is None and model.moved_to == torch.device("cuda", 1)


def test_bf16_probe_still_takes_including_emulation():
    # torch 2.13: is_bf16_supported(including_emulation=True); the default counts pre-Ampere emulation.
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters


@pytest.mark.parametrize(("native", "emulated", "expect"), [
    (True, True, torch.bfloat16),  # Ampere and later (or ROCm)
    (False, True, torch.float16),  # Volta/Turing: bf16 only emulated
    (False, False, torch.float16),
])
def test_auto_dtype_is_bf16_only_where_native(monkeypatch, native, emulated, expect):
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert select_compute_dtype("auto", torch.device("cuda", 1)) == expect
    assert select_compute_dtype("auto", CPU) == torch.float32
    assert select_compute_dtype("auto", torch.device("cuda", 0), bf16_supported=True) == torch.bfloat16


def _tiny_dora_model(dtype: torch.dtype) -> torch.nn.Module:
    """A tiny Llama in ``dtype`` with a DoRA adapter left in that dtype, as TRL leaves a quantised model's."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).to(dtype)
    lora = LoraConfig(r=2, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    return get_peft_model(base, lora, autocast_adapter_dtype=False)


def _mixed_precision_step(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """One optimizer step as the Trainer takes it: autocast forward, GradScaler, unscale, step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(0, 32, (2, 8))
    with torch.autocast("cpu", dtype=dtype):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)


def test_fp16_master_weights_break_the_grad_scaler():
    # The failure upcast_trainable_params prevents (what fp16 training on a pre-Ampere GPU hits).
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _mixed_precision_step(_tiny_dora_model(torch.float16), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trainable_weights_and_dora_magnitude_become_float32(dtype):
    model = _tiny_dora_model(dtype)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert all(p.dtype == dtype for p in trainable.values())

    assert upcast_trainable_params(model) == len(trainable)

    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == dtype for p in frozen)  # the base is not upcast
    _mixed_precision_step(model, dtype)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    assert upcast_trainable_params(model) == 0


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", *BNB_OPTIMIZERS])
def test_chosen_optimizer_reaches_sft_config(tmp_path, optim):
    cfg = load_config(None, [f"train.optim={optim}"])
    assert build_sft_config(cfg, tmp_path, torch.float32, CPU).optim == optim


def test_default_optimizer_is_transformers_default():
    # Training before train.optim existed used SFTConfig's default; the default keeps it.
    assert load_config(None).train.optim == SFTConfig.__dataclass_fields__["optim"].default == "adamw_torch_fused"


@pytest.mark.parametrize("cuda", [False, True])
def test_bitsandbytes_optimizers_accepted_with_or_without_cuda(monkeypatch, cuda):
    # bitsandbytes 0.50.2 steps 8-bit and paged optimizers on CPU too (paged ones unpaged there).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for optim in BNB_OPTIMIZERS:
        assert load_config(None, [f"train.optim={optim}"]).train.optim == optim


def test_optimizer_refused_at_validation(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"train\.optim: train\.optim=paged_adamw_8bit needs the bitsandbytes"):
        load_config(None, ["train.optim=paged_adamw_8bit"])
    assert load_config(None, ["train.optim=adamw_torch"]).train.optim == "adamw_torch"
    with pytest.raises(ConfigError, match=r"train\.optim"):
        load_config(None, ["train.optim=sgd"])


@pytest.mark.parametrize("optim", BNB_OPTIMIZERS)
def test_bitsandbytes_optimizer_steps_on_cpu_like_adamw(tmp_path, optim):
    """Built the way the Trainer builds it; 8-bit states, and updates close to torch's AdamW."""
    args = build_sft_config(load_config(None, [f"train.optim={optim}", "train.learning_rate=0.01"]),
                            tmp_path, torch.float32, CPU)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8192))  # bitsandbytes keeps state of tensors < 4096 elements in 32 bits
    reference = torch.nn.Parameter(param.detach().clone())
    optimizer = optimizer_cls([param], **kwargs)
    reference_optimizer = torch.optim.AdamW([reference], lr=kwargs["lr"], betas=kwargs["betas"], eps=kwargs["eps"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            grad = torch.randn(8192)
            param.grad, reference.grad = grad.clone(), grad.clone()
            optimizer.step()
            reference_optimizer.step()
    state_dtype = torch.uint8 if "8bit" in optim else torch.float32
    assert optimizer.state[param]["state1"].dtype == state_dtype
    assert torch.allclose(param, reference, atol=5e-3 if "8bit" in optim else 1e-5)
    paged_fallback = any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught)
    assert paged_fallback == optim.startswith("paged")
