"""Shared helpers for the benchmark scripts: timing, memory, card name, JSON output."""
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_shape(parser, text, pattern):
    """``"64x30x256"`` -> (64, 30, 256) for a ``pattern`` such as ``"BxLxT"``: positive integers, as many as the
    pattern names; anything else is an argparse usage error naming the option."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != len(pattern.split("x")) or min(dims) < 1:
        parser.error(f"--shape must be {pattern} with positive integers, got {text!r}")
    return dims


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def time_ms(fn, device, warmup=3, rep=None, gpu_rep_ms=100):
    """Median milliseconds of ``fn()`` and the 0.2/0.8 quantiles.

    GPU: triton.testing.do_bench over about ``gpu_rep_ms`` of runs (it flushes the L2 cache between runs);
    raise it for functions of tens of milliseconds or more, or the median is of one or two runs.
    CPU: wall-clock over a few repetitions (CPU timings here are indicative only).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med, q20, q80 = do_bench(fn, rep=gpu_rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return med, q20, q80
    for _ in range(warmup):
        fn()
    times = []
    budget_s, start = 5.0, time.perf_counter()
    n = rep or 10
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if rep is None and time.perf_counter() - start > budget_s and i >= 2:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def extra_memory_bytes(fn, device):
    """Peak memory ``fn()`` allocates beyond what is live before it (CUDA only; None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0


def print_table(rows, columns):
    """Print ``rows`` (list of dicts) as an aligned text table with the given (key, header) columns."""
    cells = [[h for _, h in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def card_slug(device):
    """The card's name as a file-name part: ``NVIDIA H200`` -> ``nvidia_h200``, ``CPU (x86_64, 2 threads)`` ->
    ``cpu_x86_64_2_threads``."""
    return re.sub(r"[^0-9a-z]+", "_", device_name(torch.device(device)).lower()).strip("_")


def results_path(results_dir, name, device, tag=None):
    """``<results_dir>/<name>/<card>[_<tag>].json``: one folder per benchmark, one file per device (``tag`` names
    a variant of the measurement, e.g. ``channels_last``)."""
    slug = card_slug(device) + (f"_{tag}" if tag else "")
    return os.path.join(results_dir, name, f"{slug}.json")


def write_results(name, device, rows, extra=None, out_dir=None, tag=None):
    """Write ``rows`` to ``bench/results/<name>/<card>[_<tag>].json`` (and the same under $OUT when set); return
    the path."""
    device = torch.device(device)
    card = device_name(device)
    payload = {
        "benchmark": name,
        "device": card,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    try:
        import triton

        payload["triton"] = triton.__version__
    except Exception:
        payload["triton"] = None
    if extra:
        payload.update(extra)
    if tag:
        payload["tag"] = tag
    paths = []
    for d in filter(None, [out_dir or RESULTS_DIR, os.environ.get("OUT")]):
        path = results_path(d, name, device, tag)
        if any(os.path.realpath(path) == os.path.realpath(p) for p in paths):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0]


def time_fwd_and_bwd(run, inp, leaf, grad, device):
    """Median ms of ``run(inp)`` without autograd, and of ``run(leaf).backward(grad)`` (``leaf.grad`` reset each
    time): the forward and forward+backward columns of the op benches."""
    def fwd():
        with torch.no_grad():
            run(inp)

    def fwd_bwd():
        leaf.grad = None
        run(leaf).backward(grad)

    return time_ms(fwd, device)[0], time_ms(fwd_bwd, device)[0]


def speedup_cell(ok, impl, device, base_ms, ms):
    """A speed-up column's text: none for a wrong result, none for Triton timed off a GPU (the interpreter)."""
    if not ok:
        return "n/a (wrong)"
    if impl.startswith("triton") and torch.device(device).type != "cuda":
        return "n/a (interpreter)"
    return f"{base_ms / ms:.2f}x"


def interpreted_run(device):
    """True (after saying so) when the Triton rows ran in the CPU interpreter: their times mean nothing, so the
    bench is a correctness check and writes no results."""
    from lgvq_fast._backend import triton_interpret

    if torch.device(device).type == "cuda" or not triton_interpret():
        return False
    print("TRITON_INTERPRET=1: a correctness check only (the Triton rows ran in the CPU interpreter); "
          "no results written")
    return True


def judge_against_native(rows, errs, tols, device, skipped=(), **fields):
    """For benches whose first row is PyTorch's formulation ("native"): mark each row ``ok`` when every error in
    ``errs[impl]`` is within the matching tolerance in ``tols``, and give its fwd+bwd speed-up over the first
    row -- none for a wrong row, none for Triton rows off a GPU (interpreter times). Then append a row per
    ``(impl, why)`` in ``skipped``, carrying ``fields``. Returns ``rows``."""
    base = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["ok"] = all(e <= t for e, t in zip(errs[row["impl"]], tols))
        row["x_vs_native"] = speedup_cell(row["ok"], row["impl"], device, base, row["fwd_bwd_ms"])
    for name, why in skipped:
        rows.append({**fields, "impl": name, "fwd_ms": "skipped", "x_vs_native": why})
    return rows


def mean_std(xs):
    """{"mean", "std" (sample), "n"} of the numbers of ``xs`` that are not None; None when there is none."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs)}
