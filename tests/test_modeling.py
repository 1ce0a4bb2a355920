"""Device and dtype decisions: bf16 on capable GPUs, fp16 on older ones, fp32 on CPU."""

import pytest
import torch

from lora_pipeline.config import QuantConfig
from lora_pipeline.modeling import quantization_config, select_compute_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_dtype_per_device():
    assert select_compute_dtype("auto", CPU) == torch.float32
    assert select_compute_dtype("auto", GPU, bf16_supported=True) == torch.bfloat16
    assert select_compute_dtype("auto", GPU, bf16_supported=False) == torch.float16


def test_explicit_dtype_is_honoured():
    assert select_compute_dtype("float16", GPU) == torch.float16
    assert select_compute_dtype("float32", GPU) == torch.float32


def test_4bit_quantization_config_uses_compute_dtype():
    bnb = quantization_config(QuantConfig(), torch.float32)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32


@pytest.mark.parametrize(("quant", "expect"), [(QuantConfig(load_in_4bit=False), None)])
def test_no_quantization_means_plain_lora(quant, expect):
    assert quantization_config(quant, torch.float32) is expect


def test_8bit_quantization_config():
    bnb = quantization_config(QuantConfig(load_in_4bit=False, load_in_8bit=True), torch.float32)
    assert bnb.load_in_8bit
