"""Nearest-code search benchmark: `python bench/nn_search.py [--shapes NxKxD,...] [--metric l2|cos]`.

Rows per shape (N rows of z, K codes, D dims; random normal inputs):
- reference fp32 / fp32+tf32 / bf16: the usual full-matrix PyTorch search
  (``||z||^2 + ||e||^2 - 2 z e^T`` then argmin, as taming-transformers and most VQ
  code do); it allocates N x K matrices and is skipped when it would need more than
  80 % of free memory. "reference fp32" (TF32 off) is the speed-up baseline.
- reference chunked fp32: ``lgvq_fast.reference.nearest_code`` (bounded memory).
- triton exact / fast, cuda exact / fast (when ``lgvq_fast._C`` is built): the public op;
  triton exact bf16x3: the Triton kernel with split-bf16 instead of tf32x3 products.
  triton fast tma (sm_90+): ``kernels/nearest_code_tma.py``, bf16 operand copies made once per call (counted
  in its time and extra memory) and read through TMA descriptors; ``LGVQ_FAST_NN_FAST_KERNEL=tma`` makes it
  the op's fast mode. "(bf16 inputs)" rows take inputs already in bf16 (converted outside the timing), as
  the flash-kmeans row takes fp16: the TMA kernel then reads z and an l2 codebook in place.
  cuda fast tma (compute capability 9.0): the extension's TMA + wgmma kernel (``csrc/nearest_code_sm90.cu``),
  its bf16 copies of z and the codebook counted in.
  triton exact certified: one fp16 pass that proves most rows, a split-fp16 pass over the rest, float64 over
  listed candidates, then over every code for what is left (``kernels/nearest_code_certified.py``);
  ``split_pct``, ``candidate_pct`` and ``rescored_pct`` are the shares of rows each step took; "... tma"
  (sm_90+): the same passes reading their fp16 operands through TMA descriptors; "... (cuda graph)": the call
  captured once in a CUDA graph and replayed (it has no host sync; its several small launches cost less), its
  extra memory held by the graph's pool (the eager row's figure applies).
- flash-kmeans (fp16 inputs): its FlashAssign kernels, when installed (a GPU only).
- vector-quantize-pytorch: ``VectorQuantize`` forward in eval mode, when installed.

Columns: median ms (do_bench on GPU), TFLOP/s (2 N K D / time) and its share of the bf16 peak measured in
the same run (``peak_bf16_tflops`` in the JSON: the best of five 8192^3 bf16 products), extra memory
(peak beyond inputs), mismatch rate against a float64 search on the first
``--truth-rows`` rows (tie-aware: a different index whose float64 distance is
within fp32 rounding of the best counts as agreeing), and speed-up over
reference fp32. An exact-mode row that disagrees with float64 gets no speed-up
("n/a (mismatch)"); rows that round their products (tf32, bf16, fast) report
their mismatch rate and a speed-up labelled "(approx)".

On a CPU-only machine only the reference rows run, at small default shapes;
the kernels need a GPU.
"""
import argparse
import os

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import device_name, extra_memory_bytes, fmt_bytes, print_table, time_ms, write_results
from lgvq_fast import _backend
from lgvq_fast.ops import nearest_code
from lgvq_fast.reference import nearest_code as ref

# The headline shape first: results are written after every shape, so a run cut short keeps what it measured.
GPU_SHAPES = [(65536, 16384, 256), (16384, 1024, 256), (65536, 16384, 32), (65536, 16384, 8), (16384, 131072, 256)]
CPU_SHAPES = [(2048, 1024, 256), (2048, 2048, 32), (2048, 2048, 8)]
BASELINE = "reference fp32"
CERTIFIED = "triton exact certified"
# stats of each certified row's last call (rows re-scored in float64), by row name
_CERT_STATS = {}


def cuda_graphed(fn, device):
    """``fn`` captured in a CUDA graph on the first call (after two calls on a side stream that compile and tune
    its kernels), replayed on every call; returns the captured outputs, which each replay overwrites."""
    state = {}

    def run():
        if "graph" not in state:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = fn()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    return run


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise SystemExit(f"--shapes: expected NxKxD items separated by commas, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def full_matrix_search(z, codebook, metric):
    """The common PyTorch search: one N x K distance matrix, then argmin. Returns (indices, distances)."""
    if metric == "cos":
        z = torch.nn.functional.normalize(z, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
        values, indices = (z @ codebook.T).max(dim=1)
        return indices, 1.0 - values
    d = z.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * (z @ codebook.T)
    values, indices = d.min(dim=1)
    return indices, values


def free_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class TF32:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def flash_kmeans_search(z, codebook, metric):
    """flash-kmeans' fused assignment (FlashAssign: ``euclid_assign_triton`` / ``cosine_assign_triton``) on fp16
    copies of the inputs made beforehand (its kernels take fp16 or fp32; the copies and, for l2, ||z||^2 are not
    timed, which favours it); for cos the codebook is normalised inside the timed call, as the op does. Returns
    a function giving ``(indices int64, None)``, or None when flash-kmeans is not installed or z is not on CUDA."""
    if z.device.type != "cuda":
        return None
    try:
        from flash_kmeans.assign_euclid_triton import cosine_assign_triton, euclid_assign_triton
    except Exception:
        return None
    zh, eh = z.half()[None], codebook.half()[None]
    if metric == "cos":
        def run():
            e = torch.nn.functional.normalize(eh.float(), dim=-1).half()
            return cosine_assign_triton(zh, e)[0].long(), None
        return run
    z_sq = z.float().pow(2).sum(dim=1)[None]

    def run():
        return euclid_assign_triton(zh, eh, z_sq)[0].long(), None
    return run


def peak_bf16_tflops(device, n=8192, repeats=5):
    """The card's bf16 matrix-product rate measured here: the best of ``repeats`` timed ``n^3`` products
    (TFLOP/s), the ceiling each row's "% of peak" refers to; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = min(time_ms(lambda: torch.matmul(a, b), device)[0] for _ in range(repeats))
    return 2.0 * n**3 / (best * 1e-3) / 1e12


def vqp_search(z, codebook, metric):
    """vector-quantize-pytorch's VectorQuantize forward (eval mode) with our codebook loaded; or None."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except Exception:
        return None
    K, D = codebook.shape
    vq = VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=metric == "cos").to(z.device).eval()
    vq._codebook.embed.data.copy_(codebook.reshape(vq._codebook.embed.shape))

    @torch.no_grad()
    def run():
        _, indices, _ = vq(z[None])
        return indices.reshape(-1), None

    return run


def candidates(z, codebook, metric, device):
    """(name, fn returning (indices, distances or None), exact mode?, memory estimate) rows for this device."""
    N, D = z.shape
    K = codebook.shape[0]
    full_bytes = 3 * N * K * 4
    zb, eb = z.to(torch.bfloat16), codebook.to(torch.bfloat16)
    rows = [(BASELINE, lambda: full_matrix_search(z, codebook, metric), True, full_bytes)]
    if device.type == "cuda":
        rows.append(("reference fp32+tf32", lambda: full_matrix_search(z, codebook, metric), False, full_bytes))
    rows.append(("reference bf16", lambda: full_matrix_search(zb, eb, metric), False, full_bytes // 2))
    rows.append(("reference chunked fp32", lambda: ref.nearest_code(z, codebook, metric), True, 0))
    if device.type == "cuda":
        for impl, ok in (("triton", _backend.triton_available()), ("cuda", _backend.cuda_ext_available())):
            if not ok:
                continue
            for precision in ("exact", "fast"):
                rows.append(
                    (
                        f"{impl} {precision}",
                        lambda i=impl, p=precision: nearest_code(z, codebook, metric, p, i),
                        precision == "exact",
                        0,
                    )
                )
    if device.type == "cuda" and _backend.triton_available():
        from lgvq_fast.kernels.nearest_code import nearest_code_fwd
        from lgvq_fast.kernels.nearest_code_certified import nearest_code_certified

        variants = [(CERTIFIED, False)]
        if torch.cuda.get_device_capability(device)[0] >= 9:
            variants.append((CERTIFIED + " tma", True))
        for name, tma in variants:
            for graph in (False, True):
                label = name + (" (cuda graph)" if graph else "")
                stats = _CERT_STATS.setdefault(label, {})
                fn = lambda s=stats, t=tma: nearest_code_certified(z, codebook, metric, stats=s, tma=t)  # noqa: E731
                rows.append((label, cuda_graphed(fn, device) if graph else fn, True, 0))

        rows.append(("triton fast (bf16 inputs)", lambda: nearest_code_fwd(zb, eb, metric, "fast"), False, 0))
        if torch.cuda.get_device_capability(device)[0] >= 9:
            from lgvq_fast.kernels.nearest_code_tma import nearest_code_fast_tma

            rows.append(("triton fast tma", lambda: nearest_code_fast_tma(z, codebook, metric), False, 0))
            rows.append(("triton fast tma (bf16 inputs)", lambda: nearest_code_fast_tma(zb, eb, metric), False, 0))
        rows.append(
            (
                "triton exact bf16x3",
                lambda: nearest_code_fwd(z, codebook, metric, "exact", exact_split="bf16x3"),
                True,
                0,
            )
        )
    if device.type == "cuda" and _backend.cuda_ext_available() and torch.cuda.get_device_capability(device) == (9, 0):
        from lgvq_fast import _cuda

        rows.append(("cuda fast tma", lambda: _cuda.nearest_code(z, codebook, metric, "fast_tma"), False, 0))
        rows.append(("cuda fast tma (bf16 inputs)", lambda: _cuda.nearest_code(zb, codebook, metric, "fast_tma"),
                     False, 0))
    fk = flash_kmeans_search(z, codebook, metric)
    if fk is not None:
        rows.append(("flash-kmeans (fp16 inputs)", fk, False, 0))
    vqp = vqp_search(z, codebook, metric)
    if vqp is not None:
        rows.append(("vector-quantize-pytorch", vqp, False, 2 * full_bytes))
    return rows


def bench_shape(shape, metric, device, truth_rows, peak=None, only=None):
    N, K, D = shape
    gen = torch.Generator(device="cpu").manual_seed(N * 31 + K * 7 + D)
    z = torch.randn(N, D, generator=gen).to(device)
    codebook = torch.randn(K, D, generator=gen).to(device)
    S = min(N, truth_rows)
    truth, _ = ref.exact_nearest(z[:S], codebook, metric)
    flops = 2.0 * N * K * D
    results, base_ms = [], None
    for name, fn, exact, need in candidates(z, codebook, metric, device):
        if only is not None and name != BASELINE and not any(part in name for part in only):
            continue
        row = {"shape": f"{N}x{K}x{D}", "impl": name, "metric": metric}
        if need > 0.8 * free_memory_bytes(device):
            row.update(ms="skipped", note=f"needs ~{fmt_bytes(need)}, over 80% of free memory")
            results.append(row)
            continue
        with TF32(name.endswith("+tf32")):
            indices = fn()[0]
            mismatch = ref.tie_aware_mismatch(z[:S], codebook, indices[:S], metric, truth=truth)
            if name.startswith(CERTIFIED):
                stats = _CERT_STATS[name]
                rescored, split = int(stats["rescored"]), int(stats["split_rows"])
                listed = int(stats["candidate_rows"])
                row.update(rescored_rows=rescored, rescored_pct=f"{100 * rescored / max(N, 1):.2f}%",
                           split_rows=split, split_pct=f"{100 * split / max(N, 1):.2f}%",
                           candidate_rows=listed, candidate_pct=f"{100 * listed / max(N, 1):.2f}%")
            del indices
            extra = extra_memory_bytes(fn, device)
            ms, q20, q80 = time_ms(fn, device)
        row.update(
            ms=round(ms, 4),
            ms_q20=round(q20, 4),
            ms_q80=round(q80, 4),
            tflops=float(f"{flops / (ms * 1e-3) / 1e12:.3g}"),
            extra_bytes=extra,
            extra_mem=fmt_bytes(extra),
            mismatch=mismatch,
            mismatch_pct=f"{100 * mismatch:.3f}%",
            exact_mode=exact,
        )
        if peak is not None:
            row["pct_of_peak"] = round(100.0 * flops / (ms * 1e-3) / 1e12 / peak, 1)
        if name == BASELINE:
            base_ms = ms
        results.append(row)
    for row in results:
        if not isinstance(row.get("ms"), float):
            row["speedup"] = "n/a"
        elif base_ms is None:
            row["speedup"] = "n/a (no baseline)"
        elif row["impl"] == BASELINE:
            row["speedup"] = "1.00x (baseline)"
        elif row["exact_mode"] and row["mismatch"] > 0:
            row["speedup"] = "n/a (mismatch)"
        else:
            label = "" if row["exact_mode"] else " (approx)"
            row["speedup"] = f"{base_ms / row['ms']:.2f}x{label}"
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", help="comma-separated NxKxD list (default: GPU set on CUDA, small set on CPU)")
    parser.add_argument("--metric", choices=("l2", "cos"), default="l2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--truth-rows", type=int, default=4096, help="rows checked against float64")
    parser.add_argument("--only", help="comma-separated parts of row names to keep (e.g. 'fast,flash'); the "
                        f"baseline ({BASELINE}) always runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    print(f"nearest_code benchmark on {device_name(device)}, metric={args.metric}")
    if device.type != "cuda":
        print("CPU run: only the PyTorch reference rows are timed; the Triton and CUDA kernels need a GPU.")
    rows = []
    peak = peak_bf16_tflops(device)
    if peak is not None:
        print(f"bf16 peak measured here: {peak:.0f} TFLOP/s (best of 5 8192^3 products)")
    extra = {"metric": args.metric, "truth_rows": args.truth_rows, "peak_bf16_tflops": peak, "only": args.only}
    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else None
    for i, shape in enumerate(shapes):
        rows.extend(bench_shape(shape, args.metric, device, args.truth_rows, peak, only))
        path = write_results("nn_search", device, rows, extra={**extra, "complete": i == len(shapes) - 1})
        print(f"{shape}: {len(rows)} rows so far, written to {path}", flush=True)
    columns = [
        ("shape", "N x K x D"),
        ("impl", "impl"),
        ("ms", "ms"),
        ("tflops", "TFLOP/s"),
        ("pct_of_peak", "% of bf16 peak"),
        ("extra_mem", "extra mem"),
        ("mismatch_pct", "mismatch vs fp64"),
        ("speedup", f"speed-up vs {BASELINE}"),
        ("split_pct", "split level"),
        ("candidate_pct", "candidates"),
        ("rescored_pct", "full float64"),
        ("note", "note"),
    ]
    print_table(rows, columns)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
