"""Quantised expert formats found on the Hub, and the reference dequantisers GRAPE uses.

* **Block-wise FP8** (DeepSeek-V3, Kimi-K2): ``<linear>.weight`` in float8_e4m3fn plus
  ``<linear>.weight_scale_inv`` (float32, one value per ``weight_block_size`` block, default
  128 x 128, edge blocks partial); config ``quantization_config = {"quant_method": "fp8",
  "weight_block_size": [128, 128], ...}``.
* **MXFP4** (gpt-oss): fused ``experts.{gate_up,down}_proj_blocks`` (uint8, two E2M1 values per
  byte, 32 values per block) and ``..._scales`` (uint8 E8M0 exponents), expert on dim 0.

Removing experts needs no arithmetic on either: streaming apply (grape/pruning/streaming.py) drops or
slices the quantised tensors with their scales and keeps ``quantization_config``, so the pruned
checkpoint stays quantised. ``merge`` averages weights, which quantised storage cannot do
exactly, so it is refused (:func:`check_method`). The dequantisers below are exact (float32)
and serve as the reference in tests and for anyone who wants float weights.
"""

from __future__ import annotations

from typing import Any

from grape.errors import PlanError

# values of the 16 E2M1 codes (low nibble = even element), as in transformers' integrations.mxfp4
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quant_method(config: dict[str, Any]) -> str | None:
    """The checkpoint's quantisation method from config.json (``fp8``, ``mxfp4``, ...), or None."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method")
    return str(method) if method else "unknown"


def describe(config: dict[str, Any]) -> str | None:
    """A few words on the quantisation, e.g. 'fp8, 128x128 blocks', or None."""
    method = quant_method(config)
    if method is None:
        return None
    block = config["quantization_config"].get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2:
        return f"fp8, {block[0]}x{block[1]} blocks"
    return method


def check_method(config: dict[str, Any], method: str) -> None:
    """Refuse `merge` on a quantised checkpoint (one line, before anything is loaded)."""
    quant = describe(config)
    if method == "merge" and quant:
        raise PlanError(f"--method merge averages expert weights, but this checkpoint's weights are "
                        f"quantised ({quant}); use --method remove (the pruned experts stay "
                        "quantised) or dequantise the checkpoint first")


# -- reference dequantisers (torch imported lazily) -----------------------------------------
def dequantize_fp8_blocks(weight, scale_inv, block: tuple[int, int] = (128, 128)):
    """float32 `weight` [out, in] from float8 values and per-block scales [ceil(out/b0),
    ceil(in/b1)]; edge blocks are partial (the scale is expanded, then cropped)."""
    b0, b1 = int(block[0]), int(block[1])
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != (-(-rows // b0), -(-cols // b1)):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight "
                         f"in {b0}x{b1} blocks")
    scale = scale_inv.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    return weight.float() * scale


def quantize_fp8_blocks(weight, block: tuple[int, int] = (128, 128)):
    """(float8_e4m3fn values, float32 scale_inv) for a float `weight`, one scale per block
    (amax / 448), as DeepSeek-V3 ships them. For building test checkpoints."""
    import torch

    b0, b1 = int(block[0]), int(block[1])
    rows, cols = weight.shape
    grid = (-(-rows // b0), -(-cols // b1))
    scale = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float()
            scale[i, j] = max(float(tile.abs().max()), 1e-12) / 448.0
    expanded = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    return (weight.float() / expanded).to(torch.float8_e4m3fn), scale


def dequantize_mxfp4(blocks, scales):
    """float32 values [..., rows, groups * 32] from MXFP4 `blocks` [..., rows, groups, 16] and
    E8M0 `scales` [..., rows, groups] (not transposed: gpt-oss's fused layout transposes the
    last two dims of this)."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., rows, groups, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.flatten(-2)
