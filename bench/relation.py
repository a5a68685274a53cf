"""Relationship-alignment loss benchmark: `python bench/relation.py [--shape BxLxTxC]`.

Rows (random normal inputs, about 30 % padded words):
- reference word loop: the official code's formulation (a Python loop over word positions with
  fancy indexing, spec section 4), autograd backward;
- reference vectorised: ``lgvq_fast.reference.relation.relation_loss`` (one gather), autograd
  backward -- the baseline;
- triton: the public op (fused launches over batch elements and tiles, L <= 128).

Columns: forward ms and forward+backward ms (median; do_bench on GPU), error of the loss and of the
gradient to ``codes`` against float64, and speed-ups of fwd+bwd over the vectorised reference and
the word loop. A row whose error exceeds the tolerance (4x the vectorised fp32 reference's error,
at least 16 fp32 ulps of the value) gets no speed-up. On a CPU-only machine the triton row is
skipped (the kernel needs a GPU).
"""
import argparse

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (device_name, interpreted_run, parse_shape, print_table, speedup_cell,
                     time_fwd_and_bwd, write_results)
from lgvq_fast import _backend
from lgvq_fast.ops import relation_loss
from lgvq_fast.reference import relation as ref

GPU_SHAPE = (64, 30, 256, 512)
CPU_SHAPE = (16, 30, 64, 256)
EPS = ref.DEFAULT_EPS
F32_EPS = torch.finfo(torch.float32).eps


def word_loop_loss(text, vision, codes, pad):
    """The official formulation: one fancy-indexing gather per word position (with eps added)."""
    tn = text / text.norm(dim=-1, keepdim=True).clamp_min(EPS)
    vn = vision / vision.norm(dim=-1, keepdim=True).clamp_min(EPS)
    a, p = (tn @ vn.transpose(1, 2)).max(dim=-1)
    rows = torch.arange(text.shape[0], device=text.device)
    picked = torch.stack([codes[rows, p[:, i]] for i in range(text.shape[1])], dim=1) * a.unsqueeze(-1)
    m = pad.unsqueeze(-1).to(text.dtype)
    c_hat = picked / picked.norm(dim=-1, keepdim=True).clamp_min(EPS) * m
    t_hat = (tn * m).detach()
    return torch.nn.functional.mse_loss(c_hat @ c_hat.transpose(1, 2), t_hat @ t_hat.transpose(1, 2))


def _impls(device):
    rows = [
        ("reference word loop", word_loop_loss),
        ("reference vectorised", lambda t, v, c, p: ref.relation_loss(t, v, c, p, EPS)),
    ]
    skipped = []
    # Under TRITON_INTERPRET=1 the CPU rows check the kernels only; their times mean nothing.
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        rows.append(("triton", lambda t, v, c, p: relation_loss(t, v, c, p, eps=EPS, impl="triton")))
    else:
        skipped.append(("triton", "needs a CUDA GPU (and triton)"))
    return rows, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", help="BxLxTxC (default: 64x30x256x512 on GPU, 16x30x64x256 on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    B, L, T, C = parse_shape(parser, args.shape, "BxLxTxC") if args.shape else default
    torch.manual_seed(0)
    text = torch.randn(B, L, C, device=device)
    vision = torch.randn(B, T, C, device=device)
    codes = torch.randn(B, T, C, device=device)
    pad = torch.rand(B, L, device=device) > 0.3
    pad[:, 0] = True

    c64 = codes.double().requires_grad_()
    want_loss = ref.relation_loss(text.double(), vision.double(), c64, pad, EPS)
    (want_grad,) = torch.autograd.grad(want_loss, c64)
    want_loss = want_loss.detach()

    impls, skipped = _impls(device)
    rows, errs = [], {}
    for name, fn in impls:
        leaf = codes.clone().requires_grad_()
        loss = fn(text, vision, leaf, pad)
        loss.backward()
        loss_err = float((loss.detach().double() - want_loss).abs())
        errs[name] = (loss_err, float((leaf.grad.double() - want_grad).abs().max()))

        fwd_ms, both_ms = time_fwd_and_bwd(lambda c: fn(text, vision, c, pad), codes, leaf, None, device)
        rows.append({"impl": name, "fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(both_ms, 4),
                     "loss_err": f"{errs[name][0]:.2e}", "grad_err": f"{errs[name][1]:.2e}"})
    base_loss_err, base_grad_err = errs["reference vectorised"]
    loss_tol = max(4 * base_loss_err, 16 * F32_EPS * float(want_loss.abs()))
    grad_tol = max(4 * base_grad_err, 16 * F32_EPS * float(want_grad.abs().max()))
    by_name = {r["impl"]: r for r in rows}
    for row in rows:
        row["ok"] = errs[row["impl"]][0] <= loss_tol and errs[row["impl"]][1] <= grad_tol
        for key, base in (("x_vs_vectorised", "reference vectorised"), ("x_vs_loop", "reference word loop")):
            row[key] = speedup_cell(row["ok"], row["impl"], device, by_name[base]["fwd_bwd_ms"], row["fwd_bwd_ms"])
    for name, why in skipped:
        rows.append({"impl": name, "fwd_ms": "skipped", "x_vs_vectorised": why})
    print(f"relation_loss  B={B} L={L} T={T} C={C}  on {device_name(device)}  "
          f"(tolerance loss {loss_tol:.1e}, grad {grad_tol:.1e})")
    print_table(rows, [("impl", "impl"), ("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"), ("loss_err", "loss err"),
                       ("grad_err", "grad err"), ("x_vs_vectorised", "speed-up vs vectorised"),
                       ("x_vs_loop", "vs word loop")])
    if interpreted_run(device):
        return
    # a shape other than the default gets its own file (bench/results/relation/<card>_<B>x<L>x<T>x<C>.json)
    tag = None if (B, L, T, C) == default else f"{B}x{L}x{T}x{C}"
    path = write_results("relation", device, rows, extra={"shape": {"B": B, "L": L, "T": T, "C": C}}, tag=tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
