"""Convolution weights cast once per step under autocast (lgvq_fast.models._precast, LGVQ.precast)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lgvq_fast.models import build_model, preset
from lgvq_fast.models._precast import ALIGN
from lgvq_fast.models.vqgan import Conv2d


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_precast_conv_weights_same_step_fewer_casts(channels_last):
    """Under 16-bit autocast LGVQ casts its convolution weights in one op: the same outputs and gradients
    (bit for bit) as autocast's per-call casts, with two casts fewer per weight and bias."""

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = preset("tiny-cpu")
    cfg.use_text_losses, cfg.disc_start = False, 0
    model, loss_mod = build_model(cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    runs = {}
    for precast in (False, True):
        model.precast = precast
        model.zero_grad(set_to_none=True)
        counter = CountCasts()
        with counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                # the adaptive GAN weight differentiates to the last layer on its own
                loss, _ = loss_mod.generator_loss(x, out, 10, last_layer=model.last_layer)
            loss.backward()
        runs[precast] = (out["x_rec"].detach(), [p.grad for p in model.parameters()], counter.calls["aten._to_copy"])
        assert all(m._lowp is None for m in model.modules() if isinstance(m, Conv2d))
    (rec0, grads0, casts0), (rec1, grads1, casts1) = runs[False], runs[True]
    assert torch.equal(rec0, rec1)
    for g0, g1 in zip(grads0, grads1):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    shared = sum(1 for m in model._precast_modules() for p in (m.weight, m.bias) if p is not None)
    # each shared weight/bias: one cast forward, one back; instead: one cast of the concatenation each way
    assert casts1 <= casts0 - 2 * shared + 2, (casts0, casts1, shared)
    # every gradient keeps its parameter's memory layout (ignoring size-1 dims), so none was copied
    for p in model.parameters():
        if p.grad is not None:
            assert all(gs == ps for gs, ps, n in zip(p.grad.stride(), p.stride(), p.shape) if n != 1)


def test_precast_is_off_outside_autocast_and_cleared_on_error():
    from lgvq_fast.training.step import compile_model

    cfg = preset("tiny-cpu")
    cfg.use_text_losses = False
    model, _ = build_model(cfg)
    seen = []
    hook = model.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(m._lowp))
    model(torch.rand(2, 3, 32, 32))
    assert seen == [None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    assert set(seen[1]) == {"weight", "bias"} and seen[1]["weight"].dtype == torch.bfloat16
    hook.remove()
    model.decoder.conv_out.register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    assert all(m._lowp is None for m in model.modules() if isinstance(m, Conv2d))
    assert model.decoder.conv_out not in model._precast_modules()
    compile_model(model, "blocks")
    assert model.precast is False and model._precast_modules() == ()


def test_precast_weights_are_aligned_views():
    cfg = preset("tiny-cpu")
    cfg.use_text_losses = False
    model, _ = build_model(cfg)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, dict(m._lowp)) and None)
             for m in model._precast_modules()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(model._precast_modules())
    base = None
    for m, lowp in seen.items():
        for name, t in lowp.items():
            p = getattr(m, name)
            assert t.dtype == torch.bfloat16 and t.shape == p.shape and torch.equal(t, p.detach().to(torch.bfloat16))
            base = base if base is not None else t.untyped_storage().data_ptr()
            assert t.untyped_storage().data_ptr() == base  # one shared buffer
            assert t.storage_offset() % ALIGN == 0


@pytest.mark.gpu
def test_precast_on_gpu_matches_autocast_casts():
    torch.manual_seed(0)
    cfg = preset("tiny-cpu")
    cfg.use_text_losses, cfg.disc_start = False, 0
    model, loss_mod = build_model(cfg)
    model, loss_mod = model.cuda().to(memory_format=torch.channels_last), loss_mod.cuda()
    x = (torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    runs = []
    for precast in (False, True):
        model.precast = precast
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss, _ = loss_mod.generator_loss(x, out, 10, last_layer=model.last_layer)
        loss.backward()
        runs.append((out["x_rec"].float().detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=2e-2, atol=2e-2)
    for g1, g0 in zip(runs[1][1], runs[0][1]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g1, g0, rtol=5e-2, atol=5e-2 * g0.abs().max().item() + 1e-8)
