"""Codebook EMA update benchmark: `python bench/ema.py [--shape NxKxD]`.

Rows (random normal z, uniform random indices -- with ``--skew``, half the rows on one code -- fp32 buffers):
- reference one-hot: the textbook ``one_hot(indices) ^T @ z`` update (an N x K matrix) -- the baseline;
- reference index_add: ``lgvq_fast.reference.ema`` (bincount + index_add_);
- triton deterministic / triton atomic: the public op (sorted segments, or float atomics);
- triton deterministic scan: the kernels' scan path (fixed chunks of sorted rows, a segmented scan and a
  fix-up for codes spanning chunks), a candidate for the deterministic default;
- flash-kmeans sorted sums + EMA: its sort-inverse centroid sums, then the EMA in PyTorch (when installed).
- cuda: the public op with ``impl="cuda"`` when ``lgvq_fast._C`` is built.
The public-op rows pass ``check_indices=False`` (the range check is a device sync; the indices
here come from ``randint`` and are in range).

Columns: median ms (do_bench on GPU), GB/s (z + indices read, buffers read and written once) and its share
of the copy bandwidth measured in the same run (``copy_GBps`` in the JSON),
max abs error of ``embed`` against a float64 update, and speed-up over the one-hot reference. A row
whose error exceeds the tolerance (4x the index_add reference's own fp32 error, at least 16 fp32
ulps of the largest value) gets no speed-up. On a CPU-only machine only the reference rows run.
"""
import argparse

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (device_name, interpreted_run, parse_shape, print_table, speedup_cell,
                     time_ms, write_results)
from lgvq_fast import _backend
from lgvq_fast.ops import ema_update_
from lgvq_fast.reference import ema as ref

GPU_SHAPE = (65536, 16384, 256)
CPU_SHAPE = (16384, 1024, 64)
DECAY, EPS = 0.99, 1e-5


def copy_gbps(device, nbytes=1 << 30, repeats=5):
    """The card's copy bandwidth measured here: the best of ``repeats`` timed copies of ``nbytes`` (GB/s, read +
    write), the ceiling of each row's "% of copy"; None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = min(time_ms(lambda: dst.copy_(src), device)[0] for _ in range(repeats))
    return 2.0 * nbytes / (best * 1e-3) / 1e9


def _flash_kmeans_update(device):
    """flash-kmeans' sort-inverse centroid sums (``triton_centroid_update_sorted_euclid`` with
    ``calculate_new=False``: sort, then sums and counts by chunks of sorted rows) followed by the EMA's decay,
    smoothing and normalisation in PyTorch; None when flash-kmeans is not installed or off CUDA."""
    if device.type != "cuda":
        return None
    try:
        from flash_kmeans.centroid_update_triton import triton_centroid_update_sorted_euclid
    except Exception:
        return None

    def run(cluster_size, embed_avg, embed, z, indices, decay, eps):
        K, D = embed_avg.shape
        sums = torch.zeros((1, K, D), device=z.device, dtype=torch.float32)
        counts = torch.zeros((1, K), device=z.device, dtype=torch.int32)
        triton_centroid_update_sorted_euclid(z[None], indices[None], embed_avg[None], centroid_sums=sums,
                                             centroid_cnts=counts, calculate_new=False)
        cluster_size.mul_(decay).add_(counts[0].to(torch.float32), alpha=1.0 - decay)
        embed_avg.mul_(decay).add_(sums[0], alpha=1.0 - decay)
        n = cluster_size.sum()
        embed.copy_(embed_avg / ((cluster_size + eps) / (n + K * eps) * n)[:, None])

    return run


def _impls(device):
    rows = [("reference one-hot", ref.ema_update_onehot_), ("reference index_add", ref.ema_update_)]
    skipped = []
    # Under TRITON_INTERPRET=1 the CPU rows check the kernels only; their times mean nothing.
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        for name, det in (("triton deterministic", True), ("triton atomic", False)):
            def run(*a, det=det):
                ema_update_(*a, deterministic=det, check_indices=False, impl="triton")

            rows.append((name, run))
        from lgvq_fast.kernels.ema import ema_update_fwd

        rows.append(("triton deterministic scan",
                     lambda *a: ema_update_fwd(*a, deterministic=True, method="scan")))
    else:
        skipped.append(("triton", "needs a CUDA GPU (and triton)"))
    fk = _flash_kmeans_update(device)
    if fk is not None:
        rows.append(("flash-kmeans sorted sums + EMA", fk))
    if device.type == "cuda" and _backend.cuda_ext_available():
        rows.append(("cuda", lambda *a: ema_update_(*a, check_indices=False, impl="cuda")))
    else:
        skipped.append(("cuda", "needs a CUDA GPU and the compiled extension lgvq_fast._C"))
    return rows, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", help="NxKxD (default: 65536x16384x256 on GPU, 16384x1024x64 on CPU)")
    parser.add_argument("--skew", action="store_true", help="half the rows assigned to one code (written to "
                        "bench/results/ema/<card>_skew.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    N, K, D = parse_shape(parser, args.shape, "NxKxD") if args.shape else default
    torch.manual_seed(0)
    z = torch.randn(N, D, device=device)
    indices = torch.randint(0, K, (N,), device=device)
    if args.skew:
        indices[torch.randperm(N, device=device)[: N // 2]] = 0
    cluster_size = torch.rand(K, device=device) * 4 + 0.5
    buffers = [cluster_size, torch.randn(K, D, device=device), torch.randn(K, D, device=device)]
    want = [b.double() for b in buffers]
    ref.ema_update_(*want, z.double(), indices, DECAY, EPS)
    scale = float(want[2].abs().max())

    impls, skipped = _impls(device)
    copy = copy_gbps(device)
    if copy is not None:
        print(f"copy bandwidth measured here: {copy:.0f} GB/s (best of 5 1 GiB copies)")
    moved = N * D * z.element_size() + N * indices.element_size() + K * D * 4 * 3 + K * 4 * 2
    rows, errors = [], {}
    for name, fn in impls:
        out = [b.clone() for b in buffers]
        fn(*out, z, indices, DECAY, EPS)
        errors[name] = float((out[2].double() - want[2]).abs().max())
        work = [b.clone() for b in buffers]
        ms, _, _ = time_ms(lambda: fn(*work, z, indices, DECAY, EPS), device)
        gbps = float(f"{moved / ms / 1e6:.3g}")
        rows.append({"impl": name, "ms": round(ms, 4), "GB/s": gbps, "max_abs_err": f"{errors[name]:.2e}"})
        if copy is not None:
            rows[-1]["pct_of_copy"] = round(100.0 * gbps / copy, 1)
    tol = max(4 * errors["reference index_add"], 16 * torch.finfo(torch.float32).eps * scale)
    base = rows[0]["ms"]
    for row in rows:
        row["ok"] = errors[row["impl"]] <= tol
        row["speedup_vs_onehot"] = speedup_cell(row["ok"], row["impl"], device, base, row["ms"])
    for name, why in skipped:
        rows.append({"impl": name, "ms": "skipped", "speedup_vs_onehot": why})
    skew = " skewed" if args.skew else ""
    print(f"ema_update_  N={N} K={K} D={D}{skew}  on {device_name(device)}  (tolerance {tol:.2e})")
    print_table(rows, [("impl", "impl"), ("ms", "ms"), ("GB/s", "GB/s"), ("pct_of_copy", "% of copy"),
                       ("max_abs_err", "max |err| vs fp64"),
                       ("speedup_vs_onehot", "speed-up vs one-hot")])
    if interpreted_run(device):
        return
    extra = {"shape": {"N": N, "K": K, "D": D}, "tolerance": tol, "skew": args.skew, "copy_GBps": copy}
    path = write_results("ema", device, rows, extra=extra, tag="skew" if args.skew else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
