"""Quantizing a span's linear layers with bitsandbytes: int8 (LLM.int8) or nf4 (4-bit NormalFloat).

Works on CPU and CUDA. Norms and embeddings stay in the server's dtype; only the decoder
layers' nn.Linear weights are replaced, so quality loss is limited to the big matrices.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

QUANT_TYPES = ("none", "int8", "nf4")


def quantize_linear_layers(module: nn.Module, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear inside `module` by its bitsandbytes counterpart, in place."""
    if quant_type == "none":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, _quantized_linear(child, quant_type, compute_dtype))
        else:
            quantize_linear_layers(child, quant_type, compute_dtype)
    return module


def _quantized_linear(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    has_bias = linear.bias is not None
    device = linear.weight.device
    if quant_type == "int8":
        quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        quantized.weight = bnb.nn.Int8Params(linear.weight.data.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    elif quant_type == "nf4":
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
        )
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"unknown quantization {quant_type!r}")
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return quantized.to(device)  # moving to the device is what quantizes the weights
