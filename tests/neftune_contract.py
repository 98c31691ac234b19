"""The NEFTune embedding contract in plain torch, shared by the Triton and CUDA kernel tests (independent of the
op layer, so the kernels are checked against the rule itself):

    out[t, j] = round_to(weight.dtype, float(weight[ids[t], j]) + fp32(u(i) * mag[t])),  i = t * d + j
    u(i) = float((int32)bits(i) - 2^15) * 2^-15,  bits(i): half i & 1 (low first) of word (i >> 1) & 3 of the
           Philox4x32-10 block i >> 3, stream 1
    rows with mag[t] == 0 are exactly weight[ids[t]]
"""

from __future__ import annotations

import torch

from fastlora.reference_lora import philox_words

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def contract(ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor, seed: int) -> torch.Tensor:
    """The rule on the CPU in fp32 arithmetic (each torch op rounds once; no FMA). Returns a CPU tensor."""
    ids, weight, mag = ids.cpu(), weight.cpu(), mag.cpu()
    T, d = ids.numel(), weight.shape[1]
    i = torch.arange(T * d)
    words = philox_words(seed, (T * d + 1) // 2, stream=1)  # word w: elements 2w (low half) and 2w + 1
    bits = (words[i >> 1] >> (16 * (i & 1))) & 0xFFFF
    u = (bits - 32768).to(torch.float32).view(T, d) * (2.0**-15)  # exact
    noise = u * mag[:, None]  # one fp32 rounding
    rows = weight[ids]
    v = (rows.to(torch.float32) + noise).to(weight.dtype)  # one fp32 add, one RNE rounding
    return torch.where((mag == 0)[:, None], rows, v)


def assert_bitwise(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape, (out.dtype, out.shape, expected.shape)
    a, b = out.cpu().view(BITS[out.dtype]), expected.cpu().view(BITS[out.dtype])
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        t, j = bad[0].tolist()
        raise AssertionError(
            f"{len(bad)} of {a.numel()} elements differ; first at [{t}, {j}]: {out[t, j].item()!r} "
            f"(bits {a[t, j].item():#x}) vs {expected[t, j].item()!r} (bits {b[t, j].item():#x})"
        )


def make_inputs(T: int, V: int, d: int, dtype: torch.dtype, *, gen_seed: int = 0, zero_rows=(), scale=0.3,
                device="cpu"):  # fmt: skip
    """ids (T,), weight (V, d), mag (T,) on ``device``; weight row 0 starts with -0.0 (and ids[0] = 0), so the
    rows with mag 0 check signed zeros; ``zero_rows``: tokens with mag 0."""
    g = torch.Generator().manual_seed(gen_seed)
    weight = torch.randn(V, d, generator=g).to(dtype)
    weight[0, : min(d, 3)] = -0.0
    ids = torch.randint(0, V, (T,), generator=g)
    ids[0] = 0
    mag = torch.rand(T, generator=g) * scale
    for t in zero_rows:
        mag[t] = 0.0
    return ids.to(device), weight.to(device), mag.to(device)
