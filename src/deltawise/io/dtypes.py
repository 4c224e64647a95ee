"""Mapping between safetensors dtype codes, torch dtypes and user-facing names."""

from __future__ import annotations

import torch

from deltawise.errors import RecipeError

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}
for _code, _dtype in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _dtype):
        SAFETENSORS_TO_TORCH[_code] = getattr(torch, _dtype)
        TORCH_TO_SAFETENSORS[getattr(torch, _dtype)] = _code

NAMED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return NAMED_DTYPES[name.lower()]
    except KeyError:
        raise RecipeError(
            f"unknown dtype {name!r}; use one of float32, float16, bfloat16, float64"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
