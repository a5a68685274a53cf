"""The whole quantizer training step a VQ user runs: `python bench/quantizer.py [--shape NxKxD]`.

One step = forward in training mode (nearest-code search, straight-through output, commitment loss, EMA codebook
update) + backward of ``output.sum() + loss`` to the input. Rows, each from the same initial state (the peer's
default initialisation, EMA decay 0.8, commitment weight 1, inputs ``[8, N/8, D]``):
- vector-quantize-pytorch: the peer's ``VectorQuantize`` with its defaults (rotation trick on) -- the baseline;
- compat: ``lgvq_fast.compat.VectorQuantize`` with the same arguments and the peer's state;
- the same two with ``rotation_trick=False`` (plain straight-through, as ours);
- VectorQuantizer: ``lgvq_fast.VectorQuantizer(ema_update=True)``, our own class (plain straight-through);
- learnable codebooks (no EMA): the peer with ``learnable_codebook=True, ema_update=False, rotation_trick=False``
  -- the baseline of these rows -- and ``VectorQuantizer(ema_update=False)``.

Checks before any speed-up is printed: each row's indices against a float64 search of the same codebook (a
differing index counts only when its float64 distance exceeds the best by more than fp32 rounding), and its
codebook after the update against a float64 EMA update with those indices (max error relative to the largest
code entry, tolerance 1e-4; learnable rows have no EMA to check). Columns: median ms per step and per eval-mode
forward, peak extra memory (GPU), mismatch rate, codebook error, speed-ups and memory ratio over the peer of the
row's kind. ``--dtype bf16`` feeds bf16 inputs. Without the peer installed (``pip install
vector-quantize-pytorch``) the speed-ups are over the compat row. Writes ``bench/results/quantizer/<card>.json``
(not under ``TRITON_INTERPRET=1``, where the Triton kernels run in the CPU interpreter).
"""
import argparse
import copy
import importlib.util

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (device_name, extra_memory_bytes, fmt_bytes, interpreted_run, parse_shape, print_table,
                     time_ms, write_results)
from lgvq_fast import VectorQuantizer
from lgvq_fast.compat import VectorQuantize
from lgvq_fast.reference import ema as ref_ema

GPU_SHAPE = (65536, 16384, 256)
CPU_SHAPE = (4096, 512, 64)
DECAY, EPS, BATCH = 0.8, 1e-5, 8
CODEBOOK_TOL = 1e-4


def _arms(D, K, device):
    """[(name, module, codebook getter or None for a learnable codebook)] from one initial state: EMA rows first
    (the peer with its default rotation trick, then without; compat likewise; VectorQuantizer), then the
    learnable-codebook rows (no EMA; the codebook gets a gradient instead)."""
    compat = VectorQuantize(dim=D, codebook_size=K, decay=DECAY, eps=EPS).to(device).train()
    arms = []
    peer_cls = None
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:
        from vector_quantize_pytorch import VectorQuantize as peer_cls

        peer = peer_cls(dim=D, codebook_size=K, decay=DECAY, eps=EPS).to(device).train()
        compat.load_state_dict(peer.state_dict())
        arms.append(("vector-quantize-pytorch", peer, lambda m: m._codebook.embed[0]))
        peer_off = peer_cls(dim=D, codebook_size=K, decay=DECAY, eps=EPS, rotation_trick=False).to(device).train()
        peer_off.load_state_dict(peer.state_dict())
        arms.append(("vector-quantize-pytorch, rotation off", peer_off, lambda m: m._codebook.embed[0]))
    arms.append(("compat", compat, lambda m: m._codebook.embed[0]))
    compat_off = VectorQuantize(dim=D, codebook_size=K, decay=DECAY, eps=EPS, rotation_trick=False).to(device)
    compat_off.load_state_dict(compat.state_dict())
    arms.append(("compat, rotation off", compat_off.train(), lambda m: m._codebook.embed[0]))
    embed0 = compat._codebook.embed[0].detach()
    ours = VectorQuantizer(D, K, ema_update=True, decay=DECAY, eps=EPS, commitment_weight=1.0).to(device).train()
    with torch.no_grad():
        ours.embed.copy_(embed0)
        ours.embed_avg.copy_(compat._codebook.embed_avg[0])
        ours.cluster_size.copy_(compat._codebook.cluster_size[0])
    arms.append(("VectorQuantizer", ours, lambda m: m.embed))
    # learnable codebooks: the codebook is a parameter and the step's backward reaches it
    if peer_cls is not None:
        peer_learn = peer_cls(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False,
                              rotation_trick=False).to(device).train()
        with torch.no_grad():
            peer_learn._codebook.embed.copy_(embed0[None])
        arms.append(("vector-quantize-pytorch, learnable", peer_learn, None))
    ours_learn = VectorQuantizer(D, K, ema_update=False, commitment_weight=1.0).to(device).train()
    with torch.no_grad():
        ours_learn.embed.copy_(embed0)
    arms.append(("VectorQuantizer, learnable", ours_learn, None))
    return arms


@torch.no_grad()
def _forward(module, x):
    return module(x)[1]


def _step(module, x):
    x = x.detach().requires_grad_(True)
    out = module(x)
    quantize, indices, loss = out[0], out[1], out[2]
    (quantize.sum() + loss.sum()).backward()
    return indices


def _check(name, module, codebook_of, x, embed0, avg0, size0):
    """(mismatch rate, codebook error) of one step from the initial state against float64."""
    module = copy.deepcopy(module)
    indices = _step(module, x).reshape(-1)
    z = x.reshape(-1, x.shape[-1]).double()
    e = embed0.double()
    dist = (e * e).sum(1)[None] - 2 * z @ e.T  # [N, K] float64, chunk-free at the shapes checked
    best = dist.min(1).values
    got = dist.gather(1, indices[:, None]).squeeze(1)
    slack = 8 * torch.finfo(torch.float32).eps * ((z * z).sum(1) + (e * e).sum(1).max())
    mismatch = float(((got - best) > slack).double().mean())
    if codebook_of is None:  # a learnable codebook: no EMA to check
        return mismatch, None
    want = [size0.double().clone(), avg0.double().clone(), e.clone()]
    ref_ema.ema_update_(*want, z, indices, DECAY, EPS)
    scale = float(want[2].abs().max())
    err = float((codebook_of(module).double() - want[2]).abs().max()) / scale
    return mismatch, err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", help="NxKxD (default: 65536x16384x256 on GPU, 4096x512x64 on CPU)")
    parser.add_argument("--check-rows", type=int, default=8192, help="rows of the float64 check (its N x K matrix)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the input's dtype (bf16: written to bench/results/quantizer/<card>_bf16.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    N, K, D = parse_shape(parser, args.shape, "NxKxD") if args.shape else default
    if N % BATCH:
        parser.error(f"--shape: N must be a multiple of {BATCH}, got {N}")
    torch.manual_seed(0)
    arms = _arms(D, K, device)
    x = torch.randn(BATCH, N // BATCH, D, device=device)
    if args.dtype == "bf16":
        x = x.bfloat16()
    check_n = max(BATCH, min(N, args.check_rows) // BATCH * BATCH)
    x_check = x.reshape(-1, D)[:check_n].reshape(BATCH, -1, D)
    compat = next(m for name, m, _ in arms if name == "compat")
    embed0 = compat._codebook.embed[0].detach().clone()
    avg0 = compat._codebook.embed_avg[0].detach().clone()
    size0 = compat._codebook.cluster_size[0].detach().clone()

    rows = []
    for name, module, codebook_of in arms:
        mismatch, err = _check(name, module, codebook_of, x_check, embed0, avg0, size0)
        ok = mismatch == 0.0 and (err is None or err <= CODEBOOK_TOL)
        work = copy.deepcopy(module)
        ms, _, _ = time_ms(lambda: _step(work, x), device, gpu_rep_ms=500)
        mem = extra_memory_bytes(lambda: _step(work, x), device)
        evaluated = copy.deepcopy(module).eval()
        fwd_ms, _, _ = time_ms(lambda: _forward(evaluated, x), device, gpu_rep_ms=200)
        rows.append({"impl": name, "ms": round(ms, 3), "fwd_ms": round(fwd_ms, 3), "extra_mem": mem,
                     "mem": fmt_bytes(mem), "mismatch": f"{mismatch:.3%}",
                     "codebook_err": "n/a (learnable)" if err is None else f"{err:.1e}", "ok": ok,
                     "learnable": codebook_of is None})
    for row in rows:
        # each row against the peer of its kind: EMA rows against the peer's default, learnable against learnable
        base = next((r for r in rows if r["learnable"] == row["learnable"]), rows[0])
        row["baseline"] = base["impl"]
        if not row["ok"]:
            row["speedup"] = "n/a (wrong)"
        elif device.type != "cuda" and row is not base and _interpreted():
            row["speedup"] = "n/a (interpreter)"
        else:
            row["speedup"] = f"{base['ms'] / row['ms']:.2f}x"
            row["fwd_speedup"] = f"{base['fwd_ms'] / row['fwd_ms']:.2f}x"
        if row["extra_mem"] and base["extra_mem"]:
            row["mem_ratio"] = f"{base['extra_mem'] / row['extra_mem']:.1f}x less"
    base = rows[0]
    print(f"quantizer training step  N={N} K={K} D={D}  on {device_name(device)}  (baseline: {base['impl']}; "
          f"checked on {check_n} rows)")
    print_table(rows, [("impl", "impl"), ("ms", "step ms"), ("fwd_ms", "eval fwd ms"), ("mem", "extra memory"),
                       ("mismatch", "mismatch vs fp64"), ("codebook_err", "codebook err"),
                       ("speedup", "step speed-up"), ("fwd_speedup", "fwd speed-up"), ("mem_ratio", "memory"),
                       ("baseline", "against")])
    if interpreted_run(device):
        return
    tag = "_".join(filter(None, [None if args.dtype == "fp32" else args.dtype,
                                 None if (N, K, D) == default else f"{N}x{K}x{D}"])) or None
    path = write_results("quantizer", device, rows, extra={"shape": {"N": N, "K": K, "D": D}, "decay": DECAY,
                                                            "dtype": args.dtype, "codebook_tolerance": CODEBOOK_TOL},
                         tag=tag)
    print(f"wrote {path}")


def _interpreted():
    from lgvq_fast._backend import triton_interpret

    return triton_interpret()


if __name__ == "__main__":
    main()
