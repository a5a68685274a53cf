"""Compile every Triton kernel of lgvq_fast for a GPU (sm_90a by default) on a machine without one.

    python scripts/triton_aot_check.py            # every launch the benchmark shapes make, all autotune configs
    python scripts/triton_aot_check.py --quick --max-configs 1   # what the test suite runs (about a minute)

The Triton interpreter (``TRITON_INTERPRET=1``, how the tests run kernels on a CPU) never lowers a kernel to
PTX, so a kernel can pass every CPU test and still fail to compile, or need more shared memory than an SM has.
This script runs the real host launchers of ``lgvq_fast.kernels`` on CPU tensors with the launch itself
intercepted: every launch (and, for autotuned kernels, every config that survives pruning) is compiled ahead
of time through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the target. It
fails when a compile fails or when a kernel's shared memory exceeds the target's per-block limit; it prints
per kernel variant the shared memory and, when ``cuobjdump`` is on PATH, registers, stack (spill) and local bytes.
Needs Triton's NVIDIA backend (ptxas ships in the triton wheel); no GPU, no CUDA driver.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels must be real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

# Shared memory one block may use, by compute capability (opt-in maximum).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
TORCH_TO_TRITON = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                   torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def arg_type(value):
    if isinstance(value, TensorDescriptor):  # host-built TMA descriptor: "tensordesc<bf16[128, 64]>"
        return mangle_type(value)
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


class Compiler:
    """Stands in for the GPU: compiles what each launch would run, once per distinct specialization."""

    def __init__(self, capability, cuobjdump):
        self.target = GPUTarget("cuda", capability, 32)
        self.capability = capability
        self.cuobjdump = cuobjdump
        self.done = {}
        self.failures = []

    def launch(self, fn, args, kwargs):
        params = fn.params
        bound = dict(zip([p.name for p in params], args))
        bound.update({k: v for k, v in kwargs.items() if k not in OPTION_KEYS})
        missing = [p.name for p in params if p.name not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: launch without {missing}")
        signature, constexprs = {}, {}
        for p in params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = bound[p.name]
            else:
                signature[p.name] = arg_type(bound[p.name])
        options = {k: kwargs[k] for k in OPTION_KEYS if kwargs.get(k) is not None}
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in self.done:
            return
        label = (f"{fn.__name__}[{', '.join(f'{k}={v}' for k, v in constexprs.items())}"
                 f"{', ' if options else ''}{', '.join(f'{k}={v}' for k, v in options.items())}]"
                 f" ({', '.join(t for t in signature.values() if t.startswith('*'))})")
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=self.target, options=options)
        except Exception as e:  # every compile error is reported, the run goes on
            msg = str(e).strip().splitlines()
            self.failures.append(f"{label}: {type(e).__name__}: {msg[-1] if msg else ''}")
            self.done[key] = None
            print(f"FAIL {label}: {type(e).__name__}: {' | '.join(msg[-3:])}", flush=True)
            return
        shared = compiled.metadata.shared
        limit = SMEM_LIMIT.get(self.capability)
        usage = self.resource_usage(compiled)
        usage.update(ptx_features(compiled.asm.get("ptx", "")))
        self.done[key] = dict(shared=shared, **usage)
        extra = "".join(f" {k} {v}" for k, v in usage.items())
        over = limit is not None and shared > limit
        if over:
            self.failures.append(f"{label}: {shared} B shared memory > {limit} B per block on sm_{self.capability}")
        print(f"{'FAIL' if over else 'ok  '} {label}: smem {shared}{extra} ({time.perf_counter() - t0:.1f}s)",
              flush=True)

    def resource_usage(self, compiled):
        """Registers, stack bytes (register spills land there) and local bytes from the cubin, when cuobjdump is available."""
        if not self.cuobjdump or "cubin" not in compiled.asm:
            return {}
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([self.cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        usage = {}
        for name, key in (("REG", "regs"), ("STACK", "stack"), ("LOCAL", "local")):
            m = re.search(rf"\b{name}:(\d+)", out.stdout)
            if m:
                usage[key] = int(m.group(1))
        return usage


def ptx_features(ptx):
    """Which tensor-core instruction and which asynchronous loads the PTX uses (only what is present)."""
    found = {}
    if "wgmma.mma_async" in ptx:
        found["mma"] = "wgmma"
    elif "mma.sync" in ptx:
        found["mma"] = "mma.sync"
    loads = [name for name, marker in (("tma", "cp.async.bulk.tensor"), ("cp.async", "cp.async.c")) if marker in ptx]
    if loads:
        found["loads"] = "+".join(loads)
    return found


def find_cuobjdump():
    """The cuobjdump that ships inside triton's NVIDIA backend, else the one on PATH."""
    try:
        import triton.backends.nvidia as nvidia

        path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def intercept(compiler, max_configs=None):
    """Route JITFunction launches to ``compiler``; autotuned launches try every config that survives pruning."""

    def jit_run(self, *args, grid, warmup, **kwargs):
        compiler.launch(self, args, kwargs)

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
            for config in configs[:max_configs]:
                if config.pre_hook:  # e.g. descriptor block shapes that follow the config
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    def heuristics_run(self, *args, **kwargs):
        for name, heur in self.values.items():
            kwargs[name] = heur({**dict(zip(self.arg_names, args)), **kwargs})
        return self.fn.run(*args, **kwargs)

    JITFunction.run = jit_run
    Autotuner.run = autotune_run
    Heuristics.run = heuristics_run


def launch_everything(quick):
    """Call every host launcher of lgvq_fast.kernels at the shapes the benchmarks and the model use."""
    from lgvq_fast.kernels import (ema, group_norm, lpips, nearest_code, nearest_code_certified, nearest_code_tma,
                                   relation)

    g = torch.Generator().manual_seed(0)
    # (N, K, D): the paper shape, the two small-D benchmark shapes, and an odd D (masked, two D tiles).
    shapes = [(512, 1024, 256), (512, 2048, 8)] if quick else [
        (512, 1024, 256), (512, 16384, 256), (512, 2048, 32), (512, 2048, 8), (300, 1000, 77)]
    for N, K, D in shapes:
        z = torch.randn(N, D, generator=g)
        cb = torch.randn(K, D, generator=g)
        for metric in ("l2", "cos"):
            for precision, split in (("exact", "tf32x3"), ("exact", "bf16x3"), ("fast", "tf32x3")):
                nearest_code.nearest_code_fwd(z, cb, metric, precision, split)
        nearest_code.nearest_code_fwd(z.bfloat16(), cb, "l2", "fast")
        for metric in ("l2", "cos"):  # the TMA fast path, fp32 and TMA-ready bf16 rows
            nearest_code_tma.nearest_code_fast_tma(z, cb, metric)
        nearest_code_tma.nearest_code_fast_tma(z.bfloat16(), cb.bfloat16(), "l2")
        nearest_code.nearest_code_fwd(z.half(), cb.half(), "l2", "exact")
        for metric in ("l2", "cos"):  # the kernel only: the float64 steps after it read what it would write
            for tma in (False, True):  # pointer loads, and TMA descriptors (LGVQ_FAST_NN_FAST_KERNEL=tma)
                for split in (False, True):
                    nearest_code_certified.certify_pass(z, cb, metric, torch.empty(N, dtype=torch.int64),
                                                        split=split, tma=tma)
                nearest_code_certified.certify_pass(z, cb, metric, torch.empty(N, dtype=torch.int64), split=True,
                                                    upper=torch.zeros(N), tma=tma)
                # levels 2 and 3 as the launcher runs them: rows compacted, their count read on the device
                sel = nearest_code_certified._compact(torch.rand(N, generator=g) < 0.1)
                nearest_code_certified.certify_pass(z, cb, metric, torch.empty(N, dtype=torch.int64), split=True,
                                                    tma=tma, select=sel)
                nearest_code_certified.certify_pass(z, cb, metric, torch.empty(N, dtype=torch.int64), split=True,
                                                    upper=torch.zeros(N), tma=tma, select=sel)
            for ok, proven in ((None, None), (torch.ones(N, dtype=torch.int8), torch.zeros(N, dtype=torch.bool))):
                # results written back to their rows (the last level marks nothing proven)
                nearest_code_certified._settle(torch.zeros(N, dtype=torch.int64), proven, *sel,
                                               torch.zeros(N, dtype=torch.int64), ok)
            # the float64 steps read 16-bit inputs as they are (quick: at the first shape only)
            sixteen = [] if quick and (N, K, D) != shapes[0] else [(z.bfloat16(), cb.half())]
            for zz, cc in [(z, cb)] + sixteen:
                codes = nearest_code_certified._prepare_codes_fused(cc, metric)[0]
                nearest_code_certified._prepare_rows_fused(zz, metric, codes)
                nearest_code_certified._final_distances(zz, cc, codes["valid"], torch.zeros(N, dtype=torch.int64),
                                                        metric)
                for cand in (None, torch.zeros(N, nearest_code_certified.CAP, dtype=torch.int32)):
                    nearest_code_certified._f64_search(zz, cc, codes, *sel, cand=cand,
                                                       count=None if cand is None else torch.ones(N, dtype=torch.int32))
    for K, D in [(1024, 256), (512, 8)] + ([] if quick else [(16384, 256), (1000, 77)]):
        N = 2048
        z = torch.randn(N, D, generator=g)
        idx = torch.randint(0, K, (N,), generator=g)
        for det in (True, False):
            ema.ema_update_fwd(torch.rand(K), torch.randn(K, D), torch.empty(K, D), z, idx, 0.99, 1e-5,
                               deterministic=det)
        counts, sums = ema.ema_counts_sums(z, idx, K)
        ema.ema_finish_(torch.rand(K), torch.randn(K, D), torch.empty(K, D), counts, sums, 0.99, 1e-5)
        ema.ema_update_fwd(torch.rand(K), torch.randn(K, D), torch.empty(K, D, dtype=torch.bfloat16),
                           z.bfloat16(), idx, 0.99, 1e-5)
        ema.ema_update_fwd(torch.rand(K), torch.randn(K, D), torch.empty(K, D), z, idx, 0.99, 1e-5, method="scan")
        ema.ema_counts_sums(z, idx, K, method="scan")
    relation_shapes = [(4, 30, 256, 512), (4, 64, 256, 256), (4, 77, 256, 512), (4, 128, 256, 512)]
    for B, L, T, C in relation_shapes + ([] if quick else [(4, 12, 64, 64), (4, 30, 1024, 768)]):
        for dtype in (torch.float32, torch.bfloat16):
            text = torch.randn(B, L, C, generator=g).to(dtype)
            vision = torch.randn(B, T, C, generator=g).to(dtype)
            codes = torch.randn(B, T, C, generator=g).to(dtype)
            pad = torch.ones(B, L)
            p = torch.zeros(B, L, dtype=torch.int64)
            a = torch.ones(B, L)
            relation.relation_loss_fwd(text, vision, codes, pad, 1e-8)
            relation.relation_loss_bwd(torch.ones(()), text, codes, pad, p, a, 1e-8)
    # the VQGAN's norms (C = 128, 256, 512 at G = 32), an odd C, both memory formats, with and without SiLU
    gn_shapes = [(2, 128, 64, 64, 32), (2, 512, 16, 16, 32)]
    gn_shapes += [] if quick else [(2, 256, 32, 32, 32), (2, 96, 9, 11, 32)]
    for N, C, H, W, G in gn_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt)
                w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
                mean, rstd = torch.zeros(N, G), torch.ones(N, G)
                for act in (True, False):
                    group_norm.group_norm_fwd(x, w, b, G, 1e-6, act)
                    group_norm.group_norm_bwd(torch.randn_like(x), x, w, b, mean, rstd, G, act)
    # the five LPIPS layers' widths (VGG16: 64, 128, 256, 512, 512), both memory formats
    for C in (64, 128, 256, 512):
        for dtype in (torch.float32, torch.bfloat16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                fx, fy = (torch.randn(1, C, 8, 8, generator=g).to(dtype).contiguous(memory_format=fmt)
                          for _ in range(2))
                w = torch.rand(C, generator=g)
                lpips.lpips_fwd(fx, fy, w, 1e-10)
                for dx, wgrad in ((False, False), (True, True)):
                    lpips.lpips_bwd(torch.ones(1), fx, fy, w, 1e-10, dx, True, wgrad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (still every kernel and constexpr variant)")
    ap.add_argument("--max-configs", type=int, help="compile at most this many autotune configs per launch")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    compiler = Compiler(args.arch, find_cuobjdump())
    intercept(compiler, args.max_configs)
    t0 = time.perf_counter()
    launch_everything(args.quick)
    n = len(compiler.done)
    print(f"{n} kernel variants compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f}s, "
          f"{len(compiler.failures)} failed")
    for f in compiler.failures:
        print("  " + f)
    spills = [v for v in compiler.done.values() if v and (v.get("stack", 0) or v.get("local", 0))]
    if spills:
        print(f"{len(spills)} of {n} variants use stack or local memory (register spills; the autotuner times them "
              f"against the others)")
    if n == 0:
        print("nothing was compiled: the launchers made no launch")
        return 1
    return 1 if compiler.failures else 0


if __name__ == "__main__":
    sys.exit(main())
