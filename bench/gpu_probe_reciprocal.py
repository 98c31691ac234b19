"""Which fp32 reciprocal bitsandbytes' CUDA quantizer scales blocks by (GPU only): quantize random fp32
weights with bitsandbytes on the GPU and with fastlora's CUDA rule (reference.quantize_4bit_gpu_rule) under
each PTX reciprocal of fastlora.kernels.approx_reciprocal, and count the packed bytes and nested codes that
differ. The instruction with zero differences everywhere is the one to use (approx_reciprocal.DEFAULT).

    python bench/gpu_probe_reciprocal.py [--elements 16777216] [--trials 2] [--diagnose]

--diagnose looks only at float32 NF4 (blocksize 64, fastlora's reciprocal), where 5 bytes of 67 million
differed on an H100 while fastlora compared with the code book's midpoints instead of the kernel's thresholds,
and prints each differing element: its value, its block's absmax and reciprocal, the scaled value, the nearest
of the kernel's NF4 thresholds (in fp32 steps), and both codes.
"""

from __future__ import annotations

import argparse
import sys

import torch


def trial_weight(trial: int, elements: int, device: str = "cuda", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Trial ``trial``'s random flat weight (scale 0.02, like a linear layer's); 7 elements fewer per trial, so
    that later trials end in a partial block."""
    g = torch.Generator(device=device).manual_seed(trial)
    return (torch.randn(elements - trial * 7, device=device, generator=g) * 0.02).to(dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 24, help="elements per trial (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=2, help="random weights per setting (default: %(default)s)")
    parser.add_argument("--diagnose", action="store_true",
                        help="only float32 NF4: print every element whose code differs from bitsandbytes'")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import bitsandbytes.functional as F

    from fastlora import reference
    from fastlora.kernels import approx_reciprocal as rcp

    if args.diagnose:
        return diagnose(F, reference, rcp, args.elements, args.trials)

    names = ["ieee", *rcp.INSTRUCTIONS]
    functions = {"ieee": None, **{n: (lambda a, n=n: rcp.approx_reciprocal(a, n)) for n in rcp.INSTRUCTIONS}}
    code = reference.dynamic_map("cuda")
    print(f"{'quant':<5} {'dtype':<9} {'blocksize':>9} " + " ".join(f"{n:>15}" for n in names))
    for quant_type in ("nf4", "fp4"):
        for dtype in (torch.float32, torch.bfloat16):
            for blocksize in (64, 32, 256):
                bad = dict.fromkeys(names, 0)
                nested_bad = dict.fromkeys(names, 0)
                for trial in range(args.trials):
                    w = trial_weight(trial, args.elements, dtype=dtype)
                    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                    compress_statistics=False)
                    _, nested_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                      compress_statistics=True)
                    centred = state.absmax - state.absmax.mean()
                    for name in names:
                        ours, _ = reference.quantize_4bit_gpu_rule(w, blocksize, quant_type, functions[name])
                        bad[name] += int((ours != packed.reshape(-1)).sum())
                        q, _ = reference.quantize_absmax_search(centred, code, 256, functions[name])
                        nested_bad[name] += int((q != nested_state.absmax.reshape(-1)).sum())
                print(f"{quant_type:<5} {str(dtype)[6:]:<9} {blocksize:>9} "
                      + " ".join(f"{bad[n]:>7}/{nested_bad[n]:<7}" for n in names), flush=True)
    print("cells: differing packed bytes / differing nested codes, summed over the trials")
    return 0


def _ordered(value: torch.Tensor) -> int:
    """An fp32 scalar as an integer that counts fp32 steps in value order (negative values too)."""
    bits = int(value.reshape(()).view(torch.int32))
    return -(bits & 0x7FFFFFFF) if bits < 0 else bits


def diagnose(F, reference, rcp, elements: int, trials: int, blocksize: int = 64, device: str = "cuda") -> int:
    """Every float32 NF4 element whose code differs from bitsandbytes' quantizer on ``device`` (its CUDA kernel),
    with the numbers that decide its code."""
    thresholds = torch.tensor(reference.NF4_GPU_THRESHOLDS, device=device)
    shown = 0
    for trial in range(trials):
        w = trial_weight(trial, elements, device)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        ours, absmax = reference.quantize_4bit_gpu_rule(w, blocksize, "nf4", rcp.approx_reciprocal)
        theirs_codes = reference.unpack_codes(packed.reshape(-1), w.numel())
        our_codes = reference.unpack_codes(ours, w.numel())
        bad = (theirs_codes != our_codes).nonzero().flatten()
        print(f"trial {trial}: {w.numel()} elements, {bad.numel()} codes differ; absmax equal: "
              f"{torch.equal(absmax, state.absmax.reshape(-1))}")
        inv = rcp.approx_reciprocal(absmax)
        for i in bad[:20].tolist():
            x, b = w[i], i // blocksize
            scaled = x * inv[b]
            nearest = int((thresholds - scaled).abs().argmin())
            steps = _ordered(scaled) - _ordered(thresholds[nearest])
            # the exact product (float64 holds it) against the threshold: what a compare contracted into an FMA sees
            exact_above = float(x.double() * inv[b].double()) > float(thresholds[nearest].double())
            print(f"  [{i}] x={x.item():.9e} absmax={absmax[b].item():.9e} inv={inv[b].item():.9e} "
                  f"x*inv={scaled.item():.9e} threshold[{nearest}]={thresholds[nearest].item():.9e} "
                  f"({steps:+d} fp32 steps; exact product {'above' if exact_above else 'not above'}) "
                  f"ours={int(our_codes[i])} bitsandbytes={int(theirs_codes[i])}")
            shown += 1
    print(f"{shown} shown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
