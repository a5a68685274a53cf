"""The training step without host synchronisation, and its CUDA-graph capture (lgvq_fast/train_graph.py).

On CPU: a dispatch-mode audit of one full training step (text encoder, generator forward and backward with the
adaptive GAN weight, both optimizer updates) for every quantizer the presets use, which fails on any operator
that would make the host wait for a CUDA device (``.item()``/``bool()``, ``nonzero``, ``bincount``, boolean
indexing, ...). On a GPU: the captured step against the eager one.
"""
import collections
import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lgvq_fast.models import PerceptualLoss, TextEncoder, build_model, preset
from lgvq_fast.quantize import code_counts
from lgvq_fast.train import make_optimizers, train_step
from lgvq_fast.train_utils import DiscSwap, place_models

# operators whose CUDA implementation copies a value to the host and waits for it
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static_fallback", "argwhere", "bincount", "_unique2",
             "unique_dim", "unique_consecutive", "masked_select", "repeat_interleave", "equal", "is_nonzero",
             "allclose", "histc", "one_hot"}
# host reads that only happen on CPU tensors (the branch is skipped on an accelerator)
_CPU_ONLY_LINES = ("n = max(int(pad.sum(1).max()), 1)",)


class HostSyncAudit(TorchDispatchMode):
    """Records (operator, call site) for every operator that would synchronise a CUDA device with the host."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if name in _SYNC_OPS or bool_index:
            stack = [f for f in traceback.extract_stack() if "lgvq_fast" in f.filename or "torch" in f.filename]
            ours = [f for f in stack if f"{os.sep}lgvq_fast{os.sep}" in f.filename]
            if not (ours and any(line in (ours[-1].line or "") for line in _CPU_ONLY_LINES)):
                site = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in ours[-3:])
                self.hits[(name + (" (bool index)" if bool_index else ""), site)] += 1
        return func(*args, **(kwargs or {}))


def _tiny_setup(quantizer, device="cpu", perceptual=False, **overrides):
    kw = dict(resolution=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
              embed_dim=8, codebook_size=32, max_text_len=12, mtp_ffn_hidden=16, disc_ndf=8, disc_layers=2,
              disc_start=0, vt_layers=1, mtp_layers=1)
    kw.update(overrides)
    if quantizer == "vq-ema":
        cfg = preset("cub", ema_update=True, **kw)
    else:
        cfg = preset("cub" if quantizer == "vq" else "cub-cvq", **kw)
    text_encoder = TextEncoder.build("tiny-random", max_len=cfg.max_text_len)
    model, loss_mod = build_model(cfg, text_encoder)
    if perceptual:
        loss_mod.perceptual, loss_mod.perceptual_weight = PerceptualLoss(), 1.0
    place_models(torch.device(device), False, text_encoder, model, loss_mod)
    return cfg, text_encoder, model, loss_mod


def _text(text_encoder, b, length, seed):
    gen = torch.Generator().manual_seed(seed)
    words = "a red circle left of a small blue square above the green star".split()
    captions = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=gen))
                for n in torch.randint(3, 9, (b,), generator=gen)]
    return text_encoder.tokenize(captions, length, generator=gen)


def test_code_counts_matches_bincount():
    for shape, k in (((7, 5, 3), 11), ((0,), 4), ((1000,), 1), ((64,), 300)):
        idx = torch.randint(0, k, shape)
        got = code_counts(idx, k)
        assert got.dtype == torch.long and got.shape == (k,)
        assert torch.equal(got, torch.bincount(idx.flatten(), minlength=k))


@pytest.mark.parametrize("quantizer", ["vq", "vq-ema", "cvq"])
def test_training_step_has_no_host_sync(quantizer):
    """What runs per step on a GPU never waits for the device: the condition for a queue the host keeps ahead of
    the GPU, and for capturing the step in a CUDA graph. Fails on the operators and names their call sites."""
    cfg, te, model, loss_mod = _tiny_setup(quantizer, perceptual=True)
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-4, (0.5, 0.9), "cpu")
    for opt in (opt_g, opt_d):  # the fused Adam the trainer uses on CUDA (CPU Adam reads its step counter)
        for group in opt.param_groups:
            group["fused"] = True
    swap = DiscSwap(loss_mod, loss_mod.discriminator, loss_mod.discriminator)
    x = torch.rand(3, 3, cfg.resolution, cfg.resolution) * 2 - 1
    text = _text(te, 3, cfg.max_text_len, seed=1).fixed_size()  # as GraphedTrainStep feeds it

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)

    for step in (0, 1):  # the first step creates the optimizer state
        audit = HostSyncAudit()
        with audit:
            out, logs = train_step(model, model, loss_mod, swap, opt_g, opt_d, te, x, text, step, autocast, cfg)
            usage = code_counts(out["indices"], cfg.codebook_size)
        assert not audit.hits, f"host syncs in the training step: {dict(audit.hits)}"
        assert "d_loss" in logs and usage.sum() == out["indices"].numel()


def test_host_sync_audit_catches_syncs():
    audit = HostSyncAudit()
    t = torch.randn(10)
    with audit:
        _ = float(t.sum())
        _ = t[t > 0]
        _ = torch.bincount(torch.randint(0, 3, (5,)))
    names = {name for name, _ in audit.hits}
    assert {"_local_scalar_dense", "bincount"} <= names and any("bool index" in n or n == "nonzero" for n in names)


def test_cuda_graph_step_rejects_what_it_cannot_capture():
    from lgvq_fast.train_graph import GraphedTrainStep

    cfg, te, model, loss_mod = _tiny_setup("vq")
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-4, (0.5, 0.9), "cpu", capturable=True)
    swap = DiscSwap(loss_mod, loss_mod.discriminator, loss_mod.discriminator)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)

    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, model, loss_mod, swap, opt_g, opt_d, te, autocast, cfg)


def test_cuda_graph_config_errors_name_the_field():
    from lgvq_fast.train_config import ConfigError, PRESETS, validate_config

    cfg = PRESETS["tiny-cpu"]()
    cfg.train.cuda_graph = True
    with pytest.raises(ConfigError, match="threshold_ema_dead_code"):
        validate_config(cfg)
    cfg.model.quantizer_kwargs = {}
    cfg.train.compile = True
    with pytest.raises(ConfigError, match="train.compile"):
        validate_config(cfg)
    cfg.train.compile, cfg.train.device = False, "cpu"
    with pytest.raises(ConfigError, match="CUDA"):
        validate_config(cfg)
    cfg.train.device = "auto"
    validate_config(cfg)


def test_auto_settings_parse_validate_and_resolve():
    """train.cuda_graph / train.channels_last take auto, true or false; "auto" is checked only once the device is
    known (resolve_auto): captured on CUDA with one process and nothing that reads the device on the host,
    channels_last with it; explicit values are kept."""
    from lgvq_fast.train_config import ConfigError, PRESETS, apply_override, resolve_auto, validate_config

    cfg = PRESETS["cub"]()
    assert cfg.train.cuda_graph == "auto" and cfg.train.channels_last == "auto"
    for text, want in (("true", True), ("OFF", False), ("auto", "auto"), ("1", True)):
        apply_override(cfg, f"train.cuda_graph={text}")
        assert cfg.train.cuda_graph is want if want != "auto" else cfg.train.cuda_graph == "auto"
    for bad in ("maybe", "none", "2"):
        with pytest.raises(ConfigError, match="train.channels_last"):
            apply_override(cfg, f"train.channels_last={bad}")
    cfg.train.cuda_graph = "yes"
    with pytest.raises(ConfigError, match="train.cuda_graph must be auto, true or false"):
        validate_config(cfg)

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def resolved(device, world=1, **changes):
        c = PRESETS["cub"]()
        c.data.root = "cub-folder"  # validated as a name only
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(c, section), name, value)
        validate_config(c) if device.type == "cpu" else None  # "auto" passes validation anywhere
        names = resolve_auto(c, device, world)
        return c.train.cuda_graph, c.train.channels_last, names

    assert resolved(cuda) == (True, True, ["train.cuda_graph", "train.channels_last"])
    assert resolved(cpu) == (False, False, ["train.cuda_graph", "train.channels_last"])
    assert resolved(cuda, world=2)[:2] == (False, False)
    assert resolved(cuda, train__compile=True)[:2] == (False, False)
    assert resolved(cuda, model__quantizer_kwargs={"threshold_ema_dead_code": 1.0})[:2] == (False, False)
    assert resolved(cuda, model__quantizer_kwargs={"check_finite": True})[:2] == (False, False)
    assert resolved(cuda, train__channels_last=False) == (True, False, ["train.cuda_graph"])
    assert resolved(cuda, train__cuda_graph=False) == (False, False, ["train.channels_last"])
    assert resolved(cpu, train__channels_last=True)[:2] == (False, True)
    # PyTorch's norms would convert around every GroupNorm in channels_last
    assert resolved(cuda, train__norm_impl="native")[:2] == (True, False)
    # asked for where it cannot run: refused once the device and the process count are known
    for device, world in ((cpu, 1), (cuda, 2)):
        c = PRESETS["cub"]()
        c.train.cuda_graph = True
        with pytest.raises(ConfigError, match="train.cuda_graph=true needs CUDA and one process"):
            resolve_auto(c, device, world)
    # the default run (tiny-cpu: dead-code restart) and an explicit request that cannot hold
    c = PRESETS["tiny-cpu"]()
    validate_config(c)
    assert resolve_auto(c, cuda, 1) and c.train.cuda_graph is False
    c = PRESETS["cub"]()
    c.data.root = "cub-folder"
    c.train.cuda_graph, c.model.quantizer_kwargs = True, {"check_finite": True}
    with pytest.raises(ConfigError, match="check_finite"):
        validate_config(c)


@contextlib.contextmanager
def _fixed_cuda_numerics():
    """cuDNN's heuristic, deterministic algorithm for each convolution and no TF32, restored afterwards: the two
    runs then compute the same kernels on the same inputs. Otherwise (a cudnn.benchmark left on by an earlier
    test, TF32 convolutions) a difference of one rounding grows over the steps: from disc_start on, the adaptive
    GAN weight divides two gradient norms of a barely trained model (0.24 % on the total loss after two GAN steps,
    seen on an H200)."""
    b, c = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (b.benchmark, b.deterministic, b.allow_tf32, c.allow_tf32)
    b.benchmark, b.deterministic, b.allow_tf32, c.allow_tf32 = False, True, False, False
    try:
        yield
    finally:
        b.benchmark, b.deterministic, b.allow_tf32, c.allow_tf32 = saved


def _run_steps(quantizer, amp, steps, disc_start, graphed, **graph_kw):
    """``steps`` training steps on a fresh tiny model (same seed each call), eagerly or through GraphedTrainStep;
    returns (per-step losses and indices, final model state, the GraphedTrainStep or None)."""
    from lgvq_fast.data.collate import mix_seed
    from lgvq_fast.train_graph import GraphedTrainStep

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg, te, model, loss_mod = _tiny_setup(quantizer, device="cuda", perceptual=True, disc_start=disc_start,
                                           mtp_dropout=0.1)
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-3, (0.5, 0.9), dev, capturable=True)
    swap = DiscSwap(loss_mod, loss_mod.discriminator, loss_mod.discriminator)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False)

    # "global": no DataLoader thread here, so police every thread's CUDA calls during the capture
    runner = GraphedTrainStep(model, model, loss_mod, swap, opt_g, opt_d, te, autocast, cfg,
                              **{"warmup": 2, "capture_error_mode": "global", **graph_kw}) if graphed else None
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = (torch.rand(4, 3, cfg.resolution, cfg.resolution, generator=gen) * 2 - 1).to(dev)
        text = _text(te, 4, cfg.max_text_len, seed=step).fixed_size()
        torch.manual_seed(mix_seed(0, 0, step))
        if graphed:
            out, logs = runner(x, text, step)
        else:
            out, logs = train_step(model, model, loss_mod, swap, opt_g, opt_d, te, x, text, step, autocast, cfg)
        losses.append({k: v.detach().float().clone() for k, v in logs.items() if k in ("total", "d_loss", "mtp")})
        losses[-1]["indices"] = out["indices"].clone()
    torch.cuda.synchronize()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, state, runner


def _assert_same_run(eager, graph, amp, lr=1e-3):
    (eager_losses, eager_state), (graph_losses, graph_state) = eager, graph
    # the same kernels in both runs (_fixed_cuda_numerics): what is left are atomics' summation orders; a stale
    # input or a missed update differs by far more than this
    tol = dict(rtol=3e-2, atol=1e-3) if amp else dict(rtol=1e-3, atol=1e-4)
    assert len(eager_losses) == len(graph_losses)
    for step, (a, b) in enumerate(zip(eager_losses, graph_losses)):
        assert a.keys() == b.keys(), step
        for k in a:
            if k == "indices":
                assert (a[k] == b[k]).float().mean() > (0.9 if amp else 0.99), step
            else:
                torch.testing.assert_close(b[k], a[k], **tol, msg=lambda m: f"step {step} {k}: {m}")
    # Adam moves an element by about lr a step whatever its gradient's size, so an element whose gradient is
    # near zero can move by a different fraction of lr after a different rounding (1.8e-4 on one bias element
    # of 32 after 9 fp32 steps, H200); a missed or repeated update moves nearly every element by about lr
    ptol = dict(rtol=tol["rtol"], atol=max(tol["atol"], lr / 2))
    for k, v in eager_state.items():
        if v.is_floating_point():
            torch.testing.assert_close(graph_state[k], v, **ptol, msg=lambda m: f"{k}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer,amp", [("vq", False), ("vq", True), ("vq-ema", True), ("cvq", True)])
@_fixed_cuda_numerics()
def test_cuda_graph_step_matches_eager(quantizer, amp):
    """Capture after two warm-up steps, replay across the disc_start phase change (a second capture), against
    the same steps run eagerly on an identical model: same losses, same parameters."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    steps = 9
    eager_losses, eager_state, _ = _run_steps(quantizer, amp, steps, 5, graphed=False)
    graph_losses, graph_state, runner = _run_steps(quantizer, amp, steps, 5, graphed=True)
    assert runner.captures == 2 and runner.replays == steps - 2 * 2 and runner.capture_error is None
    _assert_same_run((eager_losses, eager_state), (graph_losses, graph_state), amp)


@pytest.mark.gpu
@_fixed_cuda_numerics()
def test_failed_capture_goes_on_eagerly(monkeypatch):
    """eager_on_capture_error (the trainer's train.cuda_graph=auto): a host read inside the captured step makes
    the capture fail; the step runs again eagerly with the same random numbers, the later steps run eagerly, and
    the run equals the eager one. Without the flag the error propagates."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import lgvq_fast.train as train_mod

    steps = 5
    eager_losses, eager_state, _ = _run_steps("vq", False, steps, 0, graphed=False)
    real_step = train_mod.train_step

    def syncing_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if torch.cuda.is_current_stream_capturing():
            float(out[1]["total"])  # a host read: not allowed while capturing
        return out

    monkeypatch.setattr(train_mod, "train_step", syncing_step)
    messages = []
    graph_losses, graph_state, runner = _run_steps("vq", False, steps, 0, graphed=True, eager_on_capture_error=True,
                                                   log=messages.append)
    assert runner.captures == 0 and runner.replays == 0 and runner.capture_error
    assert len(messages) == 1 and "goes on without the graph" in messages[0]
    _assert_same_run((eager_losses, eager_state), (graph_losses, graph_state), amp=False)
    with pytest.raises(RuntimeError):
        _run_steps("vq", False, 3, 0, graphed=True)
