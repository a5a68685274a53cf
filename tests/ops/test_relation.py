"""Tests for lgvq_fast.ops.relation_loss against float64: the reference and Triton (interpreter) backends on CPU; on a
GPU (``-m gpu``) the Triton kernels at training shapes, in fp32 and bf16, and the float-mask check."""
import pytest
import torch

from lgvq_fast import _alloc, _backend
from lgvq_fast.ops import relation_loss
from lgvq_fast.reference import relation as ref

CPU_IMPLS = ["reference"] + (["triton"] if _backend.triton_available() else [])
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
# (B, L, T, C): non-powers of two; one word and one token; L beyond one 16-row tile; C over several tiles;
# L above 32 (two 32-word row tiles of a 64-wide block); CLIP's 77 and the limit 128 with few tokens, so that words
# in different row tiles share a token (their gradients are summed across tiles).
SHAPES = [(3, 7, 50, 77), (2, 1, 1, 16), (2, 30, 33, 40), (1, 17, 9, 130), (2, 45, 20, 50), (2, 77, 5, 24),
          (1, 128, 3, 20)]
FP32_EPS = torch.finfo(torch.float32).eps


def _shape_id(s):
    return "b{}_l{}_t{}_c{}".format(*s)


def _inputs(B, L, T, C, dtype=torch.float32):
    text = torch.randn(B, L, C)
    vision = torch.randn(B, T, C)
    codes = torch.randn(B, T, C)
    pad = torch.rand(B, L) > 0.3
    pad[:, 0] = True
    return text.to(dtype), vision.to(dtype), codes.to(dtype), pad


def _official_loop_loss(text, vision, codes, pad, eps=ref.DEFAULT_EPS):
    """Official-style reference: a Python loop over word positions with fancy indexing (spec section 4)."""
    tn = text / text.norm(dim=-1, keepdim=True).clamp_min(eps)
    vn = vision / vision.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = tn @ vn.transpose(1, 2)
    a, p = sim.max(dim=-1)
    rows = torch.arange(text.shape[0])
    picked = torch.stack([codes[rows, p[:, i]] for i in range(text.shape[1])], dim=1)
    picked = picked * a.unsqueeze(-1)
    c_hat = picked / picked.norm(dim=-1, keepdim=True).clamp_min(eps) * pad.unsqueeze(-1).to(text.dtype)
    t_hat = (tn * pad.unsqueeze(-1).to(text.dtype)).detach()
    return torch.nn.functional.mse_loss(c_hat @ c_hat.transpose(1, 2), t_hat @ t_hat.transpose(1, 2))


def _match(text, vision, codes, pad, impl):
    """The (loss, p, a) the backend itself computes (the custom op's full output)."""
    return torch.ops.lgvq_fast.relation_loss(
        text.contiguous(), vision.contiguous(), codes.contiguous(), pad.float().contiguous(), ref.DEFAULT_EPS, impl
    )


def _float64_truth(text, vision, codes, pad, p):
    """Float64 loss and codes gradient, at the match ``p`` (checked tie-aware against float64 first)."""
    t64, v64 = text.double(), vision.double()
    a64, p64 = ref.relation_match(t64, v64)
    tn = t64 / t64.norm(dim=-1, keepdim=True).clamp_min(ref.DEFAULT_EPS)
    vn = v64 / v64.norm(dim=-1, keepdim=True).clamp_min(ref.DEFAULT_EPS)
    sim = tn @ vn.transpose(1, 2)
    chosen = sim.gather(2, p.unsqueeze(-1)).squeeze(-1)
    assert ((chosen - a64).abs() <= 1e-6).all(), "argmax differs from float64 beyond a tie"
    c64 = codes.detach().double().clone().requires_grad_()
    loss = ref.relation_loss_from_match(t64, c64, pad, chosen, p)
    (grad,) = torch.autograd.grad(loss, c64)
    return loss.detach(), grad


def _fp32_reference(text, vision, codes, pad, p):
    """fp32 PyTorch error scale for the derived tolerance (same match as the backend)."""
    t32, c32 = text.float(), codes.detach().float().clone().requires_grad_()
    a32, _ = ref.relation_match(t32, vision.float())
    loss = ref.relation_loss_from_match(t32, c32, pad, a32, p)
    (grad,) = torch.autograd.grad(loss, c32)
    return loss.detach(), grad


def _assert_derived(got, want64, fp32_ref, name, floor):
    """|got - float64| <= 2x the fp32 PyTorch error + an absolute floor of a few roundings."""
    got, want64, fp32_ref = got.detach(), want64.detach(), fp32_ref.detach()
    assert torch.isfinite(got).all(), f"{name}: NaN/inf (unwritten poisoned output?)"
    ref_err = (fp32_ref.double() - want64).abs().max()
    tol = 2 * ref_err + floor
    err = (got.double() - want64).abs().max()
    assert err <= tol, f"{name}: error {float(err):.3g} > tol {float(tol):.3g}"


def _check(impl, text, vision, codes, pad, rel=8 * FP32_EPS):
    """The one checker of every relation_loss result, CPU and GPU: the match tie-aware against float64, loss and
    codes gradient within the derived tolerance of float64, no NaN/inf (an unwritten poisoned output)."""
    leaf = codes.detach().clone().requires_grad_()
    loss = relation_loss(text, vision, leaf, pad, impl=impl)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert leaf.grad.dtype == codes.dtype and leaf.grad.shape == codes.shape
    _, p, _ = _match(text, vision, codes, pad, impl)
    want_loss, want_grad = _float64_truth(text, vision, codes, pad, p)
    ref_loss, ref_grad = _fp32_reference(text, vision, codes, pad, p)
    B, L = pad.shape
    # R entries are <= 1 and carry ~rel error: the loss is off by ~2 rel sqrt(loss) + rel^2; a code row's
    # gradient sums <= L words of 4/(B L L) |R_c - R_t| / ||row||, each off by ~rel.
    loss_floor = 2 * rel * float(want_loss.sqrt()) + rel**2
    norms = codes.double().norm(dim=-1)
    smallest = float(norms[norms > 0].min()) if bool((norms > 0).any()) else 1.0
    grad_floor = rel * 4.0 / (B * L) / smallest + rel * float(want_grad.abs().max())
    _assert_derived(loss, want_loss, ref_loss, "loss", loss_floor)
    _assert_derived(leaf.grad, want_grad, ref_grad, "codes.grad", grad_floor)
    return loss.detach(), leaf.grad, p


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_matches_float64(impl, shape):
    assert _alloc.poison_enabled(), "tests must run with poisoned outputs (tests/conftest.py)"
    _check(impl, *_inputs(*shape))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_padding_rows_and_float_mask(impl):
    text, vision, codes, pad = _inputs(4, 9, 20, 24)
    pad[1] = False
    pad[3, 5:] = False
    loss, grad, _ = _check(impl, text, vision, codes, pad)
    _, grad_float_mask, _ = _check(impl, text, vision, codes, pad.float())
    assert torch.equal(grad, grad_float_mask)
    _, p, _ = _match(text, vision, codes, pad, impl)
    picked = torch.zeros(codes.shape[:2], dtype=torch.bool)
    picked.scatter_(1, p, True)
    assert (grad[~picked] == 0).all(), "tokens no word picked must get exactly zero gradient"
    assert (grad[1] == 0).all(), "an all-padding caption must get zero gradient"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_duplicate_tokens_lowest_index(impl):
    B, L, T, C = 2, 6, 45, 20
    text, vision, codes, pad = _inputs(B, L, T, C)
    # Token 3 repeated at 11 and 40 (other T tiles too); words 0-2 point at it, so the argmax is a tie.
    vision[:, 11] = vision[:, 3]
    vision[:, 40] = vision[:, 3]
    text[:, :3] = vision[:, 3:4] * 2.0 + 0.01 * torch.randn(B, 3, C)
    _, p, _ = _match(text, vision, codes, pad, impl)
    assert (p[:, :3] == 3).all(), f"ties must go to the lowest index, got {p[:, :3].tolist()}"
    _check(impl, text, vision, codes, pad)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_shared_tokens_and_determinism(impl):
    # Few tokens, many words: several words pick the same token and their gradients add up.
    text, vision, codes, pad = _inputs(3, 25, 3, 18)
    _, first, _ = _check(impl, text, vision, codes, pad)
    _, second, _ = _check(impl, text, vision, codes, pad)
    assert torch.equal(first, second)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_zero_vectors_no_nan(impl):
    text, vision, codes, pad = _inputs(3, 7, 12, 16)
    text[0, 2] = 0.0
    vision[1, 4] = 0.0
    vision[2] = 0.0
    codes[0] = 0.0
    loss, grad, _ = _check(impl, text, vision, codes, pad)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_half_inputs(impl, dtype):
    # Inputs are rounded to half first; both sides then compute in fp32/float64, the gradient is rounded once.
    loss, grad, _ = _check(impl, *_inputs(2, 7, 19, 33, dtype), rel=torch.finfo(dtype).eps)
    assert grad.dtype == dtype


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_noncontiguous_inputs(impl):
    B, L, T, C = 2, 7, 15, 21
    text = torch.randn(B, C, L).transpose(1, 2)
    vision = torch.randn(T, B, C).transpose(0, 1)
    codes = torch.randn(B, T, 2 * C)[..., ::2]
    pad = (torch.rand(L, B) > 0.3).t()
    assert not (text.is_contiguous() or vision.is_contiguous() or codes.is_contiguous() or pad.is_contiguous())
    _check(impl, text, vision, codes, pad)


def test_relation_loss_reference_matches_official_word_loop():
    text, vision, codes, pad = _inputs(3, 11, 26, 30, torch.float64)
    want = _official_loop_loss(text, vision, codes, pad)
    got = ref.relation_loss(text, vision, codes, pad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_relation_loss_reference_gradcheck_and_analytic_grad():
    text, vision, codes, pad = _inputs(2, 5, 9, 7, torch.float64)
    codes.requires_grad_()
    assert torch.autograd.gradcheck(lambda c: ref.relation_loss(text, vision, c, pad), (codes,))
    a, p = ref.relation_match(text, vision)
    grad_out = torch.tensor(1.7, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref.relation_loss(text, vision, codes, pad) * grad_out, codes)
    got = ref.relation_loss_codes_grad(text, codes.detach(), pad, a, p, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_relation_loss_vision_gradient_is_zero():
    """Why the op returns no gradient for vision_tokens: the only path, through a, cancels (NOTES.md)."""
    text, vision, codes, pad = _inputs(2, 6, 10, 12, torch.float64)
    vision.requires_grad_()
    codes.requires_grad_()
    g_vision, g_codes = torch.autograd.grad(ref.relation_loss(text, vision, codes, pad), (vision, codes))
    assert g_vision.abs().max() <= 1e-12 * g_codes.abs().max()
    vision32 = vision.detach().float().requires_grad_()
    relation_loss(text.float(), vision32, codes.detach().float().requires_grad_(), pad).backward()
    assert vision32.grad is None


def test_relation_loss_bad_inputs_raise():
    B, L, T, C = 2, 5, 7, 8
    text, vision, codes, pad = _inputs(B, L, T, C)
    cases = [
        ("text_feats", dict(text_feats=torch.randn(B, L))),
        ("text_feats", dict(text_feats=torch.randint(0, 3, (B, L, C)))),
        ("vision_tokens", dict(vision_tokens=torch.randn(B, T, C + 1))),
        ("vision_tokens", dict(vision_tokens=torch.randn(B + 1, T, C))),
        ("codes", dict(codes=torch.randn(B, T + 1, C))),
        ("codes", dict(codes=torch.randn(B, T, C).double())),
        ("pad_mask", dict(pad_mask=torch.ones(B, L + 1, dtype=torch.bool))),
        ("pad_mask", dict(pad_mask=torch.ones(B, L, dtype=torch.int64))),
        ("codes", dict(codes=torch.randn(B, T, C, device="meta"))),
        ("empty batch", dict(text_feats=text[:0], vision_tokens=vision[:0], codes=codes[:0], pad_mask=pad[:0])),
        ("L=0", dict(text_feats=text[:, :0], pad_mask=pad[:, :0])),
        ("T=0", dict(vision_tokens=vision[:, :0], codes=codes[:, :0])),
        ("eps", dict(eps=0.0)),
    ]
    for match, change in cases:
        args = dict(text_feats=text, vision_tokens=vision, codes=codes, pad_mask=pad)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            relation_loss(**args)
    with pytest.raises(ValueError, match="impl"):
        relation_loss(text, vision, codes, pad, impl="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        relation_loss(text, vision, codes, pad, impl="cuda")
    if _backend.triton_available():
        long_text, long_pad = torch.randn(1, 129, C), torch.ones(1, 129, dtype=torch.bool)
        with pytest.raises(ValueError, match="L <= 128"):
            relation_loss(long_text, vision[:1], codes[:1], long_pad, impl="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_rejects_non_binary_float_mask(impl, dtype):
    """A float pad_mask must hold only 0 and 1: 2, -1, 0.5 and NaN at a random position raise ValueError naming
    pad_mask; the same mask with 0/1 values is accepted and gives the bool mask's loss."""
    B, L, T, C = 3, 9, 11, 20
    text, vision, codes, pad = _inputs(B, L, T, C)
    want = relation_loss(text, vision, codes, pad, impl=impl)
    assert torch.equal(relation_loss(text, vision, codes, pad.to(dtype), impl=impl), want)
    for value in (2.0, -1.0, 0.5, float("nan")):
        bad = pad.to(dtype)
        bad[torch.randint(0, B, ()), torch.randint(0, L, ())] = value
        with pytest.raises(ValueError, match=r"pad_mask must hold only 0 and 1.*got the value"):
            relation_loss(text, vision, codes, bad, impl=impl)


def test_relation_loss_mask_check_under_torch_compile():
    """Under torch.compile the value check is traced as torch._assert_async (no graph break with fullgraph=True):
    a 0/1 float mask runs, a mask holding 2 fails."""
    torch._dynamo.reset()
    text, vision, codes, pad = _inputs(2, 6, 10, 12)
    step = torch.compile(lambda t, v, c, m: relation_loss(t, v, c, m, impl="reference"), fullgraph=True)
    try:
        got = step(text, vision, codes, pad.float())
    except Exception as exc:
        if "C++ compiler" in str(exc) or "CppCompileError" in type(exc).__name__:
            pytest.skip(f"torch.compile cannot build CPU code here: {type(exc).__name__}")
        raise
    torch.testing.assert_close(got, relation_loss(text, vision, codes, pad, impl="reference"))
    bad = pad.float()
    bad[1, 3] = 2.0
    with pytest.raises(RuntimeError, match="pad_mask must hold only 0 and 1"):
        step(text, vision, codes, bad)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_relation_loss_opcheck(impl):
    text, vision, codes, pad = _inputs(2, 6, 11, 20)
    codes.requires_grad_()
    padf = pad.float()
    torch.library.opcheck(torch.ops.lgvq_fast.relation_loss.default, (text, vision, codes, padf, 1e-6, impl))
    _, p, a = _match(text, vision, codes.detach(), pad, impl)
    grad = torch.tensor(0.5)
    torch.library.opcheck(
        torch.ops.lgvq_fast.relation_loss_bwd.default, (grad, text, codes.detach(), padf, p, a, 1e-6, impl)
    )


def test_relation_loss_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(text, vision, codes, pad):
        return relation_loss(text, vision, codes * 2.0, pad, impl="reference") * 3.0

    text, vision, codes, pad = _inputs(2, 6, 10, 12)
    got_leaf = codes.clone().requires_grad_()
    want_leaf = codes.clone().requires_grad_()
    try:
        got = torch.compile(step, fullgraph=True)(text, vision, got_leaf, pad)
    except Exception as exc:
        if "C++ compiler" in str(exc) or "CppCompileError" in type(exc).__name__:
            pytest.skip(f"torch.compile cannot build CPU code here: {type(exc).__name__}")
        raise
    got.backward()
    want = step(text, vision, want_leaf, pad)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_leaf.grad, want_leaf.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_relation_loss_gpu_triton_matches_float64(dtype):
    text, vision, codes, pad = (t.cuda() for t in _inputs(5, 30, 256, 96, dtype))
    pad[1, 20:] = False
    rel = 8 * FP32_EPS if dtype == torch.float32 else torch.finfo(dtype).eps
    _, first, _ = _check("triton", text, vision, codes, pad, rel=rel)
    _, second, _ = _check("triton", text, vision, codes, pad, rel=rel)
    assert torch.equal(first, second)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("shape", [(4, 30, 256, 512), (3, 7, 77, 33), (64, 30, 256, 512), (8, 77, 256, 512),
                                   (4, 128, 256, 512)], ids=_shape_id)
def test_relation_loss_gpu_triton_training_shapes_match_float64(shape):
    B, L, T, C = shape
    text, vision, codes, _ = (t.cuda() for t in _inputs(B, L, T, C))
    # captions of 1..L words, padded at the end
    pad = torch.arange(L, device="cuda")[None, :] < torch.randint(1, L + 1, (B, 1), device="cuda")
    _check("triton", text, vision, codes, pad)


@pytest.mark.gpu
def test_relation_loss_gpu_float_mask_check_is_sync_free_and_fires():
    """On CUDA the float-mask check is queued with torch._assert_async: it runs inside CUDA-graph capture (a host
    sync there would raise), and a mask holding 2 stops the process with a device-side assert (in a subprocess:
    that assert leaves the CUDA context unusable)."""
    import subprocess
    import sys
    import textwrap

    text, vision, codes, pad = (t.cuda() for t in _inputs(4, 12, 40, 32))
    padf = pad.float()
    want = relation_loss(text, vision, codes, pad)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        relation_loss(text, vision, codes, padf)  # warm-up (Triton compile) outside the capture
        with torch.cuda.graph(graph, stream=stream):
            got = relation_loss(text, vision, codes, padf)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want)
    script = textwrap.dedent("""
        import torch
        from lgvq_fast.ops import relation_loss
        t, v, c = torch.randn(2, 5, 32, device="cuda"), torch.randn(2, 9, 32, device="cuda"), torch.randn(2, 9, 32, device="cuda")
        m = torch.ones(2, 5, device="cuda")
        m[1, 2] = 2.0
        relation_loss(t, v, c, m)
        torch.cuda.synchronize()
        print("NO ASSERT")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "NO ASSERT" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert" in run.stderr.lower() or "assert" in run.stderr.lower(), run.stderr[-2000:]
