"""Weights for the 4-bit quantization tests that are shared by the CPU and GPU suites."""

from __future__ import annotations

import torch

from fastlora import reference


def boundary_weight(blocksize: int) -> torch.Tensor:
    """fp32 weight, whole blocks of ``blocksize`` whose absmax is 1 (so that the scaled value is the value itself,
    with any reciprocal), holding every decision boundary of both devices' 4-bit rules: the NF4 and FP4 code
    books' fp32 midpoints (the CPU rule), bitsandbytes' CUDA thresholds (both signs for FP4), and the fp32
    values one step either side of each."""
    nf4, fp4 = reference.code_table("nf4"), reference.code_table("fp4").sort().values
    cuda_fp4 = torch.tensor(reference.FP4_GPU_THRESHOLDS)
    edges = torch.cat([(nf4[:-1] + nf4[1:]) / 2, (fp4[:-1] + fp4[1:]) / 2,
                       torch.tensor(reference.NF4_GPU_THRESHOLDS), cuda_fp4, -cuda_fp4])
    values = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    per_block = blocksize - 1
    values = torch.nn.functional.pad(values, (0, -values.numel() % per_block)).reshape(-1, per_block)
    return torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1)
