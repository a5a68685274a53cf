"""GroupNorm + SiLU benchmark: `python bench/group_norm.py [--shape NxCxHxW ...] [--dtype bf16|fp32]`.

For each shape (default on GPU: the VQGAN activations at the paper shape, batch 8, 256x256, ch 128; on CPU a
small one) and each memory format (NCHW, channels_last), rows:

- native: what the VQGAN's GroupNorm module does without the fused op, ``F.silu(F.group_norm(x, 32, w, b))``
  with the parameters cast to x's dtype (the autocast path), autograd backward -- the baseline;
- triton: ``lgvq_fast.ops.group_norm(..., act=True, impl="triton")`` (fp32 parameters read directly).

Columns: forward ms and forward+backward ms (median; do_bench on GPU), GB/s of the forward (x read, y written),
the max error of y and of dx against float64, and the speed-up of fwd+bwd over native in the same memory
format. A row whose error exceeds the tolerance (2x native's error + 4 roundings of the dtype) gets no speed-up.
On a CPU-only machine the triton rows are skipped (the kernels need a GPU; TRITON_INTERPRET=1 runs them for a
check, and their times then mean nothing).
"""
import argparse

import torch
import torch.nn.functional as F

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (device_name, interpreted_run, judge_against_native, parse_shape, print_table,
                     time_fwd_and_bwd, write_results)
from lgvq_fast import _backend
from lgvq_fast.ops import group_norm
from lgvq_fast.reference import group_norm as ref

# the VQGAN's maps at 256 px: 256^2 at 128 channels, 128^2 at 256 (between the measured win and losses: it pins the
# "auto" crossover of lgvq_fast.models.vqgan.GroupNorm), 64^2 at 256, 16^2 at 512
GPU_SHAPES = [(8, 128, 256, 256), (8, 256, 128, 128), (8, 256, 64, 64), (8, 512, 16, 16)]
CPU_SHAPES = [(2, 64, 16, 16)]
GROUPS, EPS = 32, 1e-6
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def native(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype), EPS))


def fused(x, w, b):
    return group_norm(x, w, b, GROUPS, eps=EPS, act=True, impl="triton")


def _impls(device):
    rows, skipped = [("native", native)], []
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        rows.append(("triton", fused))
    else:
        skipped.append(("triton", "needs a CUDA GPU (and triton)"))
    return rows, skipped


def bench_shape(shape, layout, dtype, device):
    N, C, H, W = shape
    x = (torch.randn(N, C, H, W, device=device) * 2 + torch.randn(1, C, 1, 1, device=device)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    dy = torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last
                                                                   if layout == "channels_last" else
                                                                   torch.contiguous_format)
    x64 = x.double().requires_grad_()
    y64 = ref.group_norm(x64, w.double(), b.double(), GROUPS, EPS, True, torch.float64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    y64 = y64.detach()
    del x64
    impls, skipped = _impls(device)
    rows, errs = [], {}
    for name, fn in impls:
        leaf = x.detach().clone().requires_grad_()
        y = fn(leaf, w, b)
        y.backward(dy)
        y = y.detach()
        errs[name] = (float((y.double() - y64).abs().max()), float((leaf.grad.double() - dx64).abs().max()))
        del y

        fwd_ms, both_ms = time_fwd_and_bwd(lambda t: fn(t, w, b), x, leaf, dy, device)
        gbps = 2 * x.numel() * x.element_size() / (fwd_ms * 1e-3) / 1e9
        rows.append({"shape": "x".join(map(str, shape)), "layout": layout, "impl": name,
                     "fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(both_ms, 4), "fwd_GBps": round(gbps, 1),
                     "y_err": f"{errs[name][0]:.2e}", "dx_err": f"{errs[name][1]:.2e}"})
    rnd = torch.finfo(dtype).eps
    y_tol = 2 * errs["native"][0] + 4 * rnd * float(y64.abs().max())
    dx_tol = 2 * errs["native"][1] + 4 * rnd * float(dx64.abs().max())
    return judge_against_native(rows, errs, (y_tol, dx_tol), device, skipped, shape="x".join(map(str, shape)),
                                layout=layout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="NxCxHxW (repeatable; default: the paper-shape VQGAN "
                                                         "activations on GPU, 2x64x16x16 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ([parse_shape(parser, s, "NxCxHxW") for s in args.shape] if args.shape
              else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    for s in shapes:
        if s[1] % GROUPS:
            parser.error(f"--shape must be NxCxHxW with C divisible by {GROUPS}, got {'x'.join(map(str, s))}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            rows += bench_shape(shape, layout, dtype, device)
    print(f"group_norm + SiLU, G={GROUPS}, {str(dtype).replace('torch.', '')}, on {device_name(device)}")
    print_table(rows, [("shape", "shape"), ("layout", "layout"), ("impl", "impl"), ("fwd_ms", "fwd ms"),
                       ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_GBps", "fwd GB/s"), ("y_err", "y err"),
                       ("dx_err", "dx err"), ("x_vs_native", "speed-up vs native")])
    if interpreted_run(device):
        return
    path = write_results("group_norm", device, rows, extra={"dtype": str(dtype), "groups": GROUPS})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
