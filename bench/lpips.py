"""LPIPS layer-distance benchmark: `python bench/lpips.py [--shape NxCxHxW ...] [--dtype bf16|fp32]`.

For each VGG16 feature shape of LPIPS at the paper shape (default on GPU: batch 8, 256x256 input:
8x64x256x256 ... 8x512x16x16, for the real and the reconstructed images; on CPU a small one) and each memory
format, rows (the gradient is taken to the reconstruction's features, as in training):

- native: LPIPS' PyTorch formulation (``f / (sqrt(sum f^2) + eps)``, difference, square, the 1x1 head, mean),
  autograd backward -- the baseline;
- triton: ``lgvq_fast.ops.lpips_distance(..., impl="triton")``.

Columns: forward ms, forward+backward ms (median; do_bench on GPU), the max error of the distances and of the
feature gradient against float64, and the speed-up of fwd+bwd over native in the same memory format. A row
whose error exceeds the tolerance (2x native's error + 8 roundings) gets no speed-up. On a CPU-only machine the
triton rows are skipped.
"""
import argparse

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (device_name, interpreted_run, judge_against_native, parse_shape, print_table,
                     time_fwd_and_bwd, write_results)
from lgvq_fast import _backend
from lgvq_fast.ops import lpips_distance
from lgvq_fast.reference import lpips as ref

GPU_SHAPES = [(8, 64, 256, 256), (8, 128, 128, 128), (8, 256, 64, 64), (8, 512, 32, 32), (8, 512, 16, 16)]
CPU_SHAPES = [(2, 64, 32, 32)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def native(fx, fy, w):
    fx = fx / (fx.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
    fy = fy / (fy.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
    d = (fx - fy).square()
    return torch.nn.functional.conv2d(d, w.view(1, -1, 1, 1).to(d.dtype)).mean(dim=(1, 2, 3))


def fused(fx, fy, w):
    return lpips_distance(fx, fy, w, impl="triton")


def bench_shape(shape, layout, dtype, device):
    n, C, H, W = shape
    fx = torch.relu(torch.randn(n, C, H, W, device=device))
    fy = (fx + 0.1 * torch.randn_like(fx)).relu().to(dtype)
    fx = fx.to(dtype)
    if layout == "channels_last":
        fx, fy = (t.contiguous(memory_format=torch.channels_last) for t in (fx, fy))
    w = torch.rand(C, device=device)
    g = torch.randn(n, device=device)
    fy64 = fy.double().requires_grad_()
    d64 = ref.lpips_distance(fx.double(), fy64, w.double(), compute_dtype=torch.float64)
    (df64,) = torch.autograd.grad(d64, fy64, g.double())
    d64 = d64.detach()
    del fy64
    impls = [("native", native)]
    skipped = []
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        impls.append(("triton", fused))
    else:
        skipped.append(("triton", "needs a CUDA GPU (and triton)"))
    rows, errs = [], {}
    for name, fn in impls:
        leaf = fy.detach().clone().requires_grad_()
        d = fn(fx, leaf, w)
        d.backward(g)
        errs[name] = (float((d.detach().double() - d64).abs().max()), float((leaf.grad.double() - df64).abs().max()))

        fwd_ms, both_ms = time_fwd_and_bwd(lambda t: fn(fx, t, w), fy, leaf, g, device)
        rows.append({"shape": "x".join(map(str, shape)), "layout": layout, "impl": name, "fwd_ms": round(fwd_ms, 4),
                     "fwd_bwd_ms": round(both_ms, 4), "d_err": f"{errs[name][0]:.2e}",
                     "df_err": f"{errs[name][1]:.2e}"})
    rnd = torch.finfo(dtype).eps
    d_tol = 2 * errs["native"][0] + 8 * rnd * float(d64.abs().max())
    df_tol = 2 * errs["native"][1] + 8 * rnd * float(df64.abs().max())
    return judge_against_native(rows, errs, (d_tol, df_tol), device, skipped, shape="x".join(map(str, shape)),
                                layout=layout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="NxCxHxW of each batch's features (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ([parse_shape(parser, s, "NxCxHxW") for s in args.shape] if args.shape
              else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            rows += bench_shape(shape, layout, dtype, device)
    print(f"LPIPS layer distance, {str(dtype).replace('torch.', '')}, on {device_name(device)}")
    print_table(rows, [("shape", "shape"), ("layout", "layout"), ("impl", "impl"), ("fwd_ms", "fwd ms"),
                       ("fwd_bwd_ms", "fwd+bwd ms"), ("d_err", "dist err"), ("df_err", "grad err"),
                       ("x_vs_native", "speed-up vs native")])
    if interpreted_run(device):
        return
    path = write_results("lpips", device, rows, extra={"dtype": str(dtype)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
