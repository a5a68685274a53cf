"""The step captured in a CUDA graph (lgvq_fast/training/cuda_graph.py): what it refuses (any machine), and on a
GPU the captured step against the eager one."""
import contextlib
import json

import pytest
import torch
from _training import (
    rows,
    run_tiny,
    text_batch,
    tiny_setup,
)

from lgvq_fast.training.checkpoint import (
    CheckpointIO,
)
from lgvq_fast.training.step import (
    TrainStep,
    make_autocast,
    make_optimizers,
)


def test_cuda_graph_step_rejects_what_it_cannot_capture():
    from lgvq_fast.training.cuda_graph import GraphedTrainStep

    cfg, te, model, loss_mod = tiny_setup("vq")
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-4, (0.5, 0.9), "cpu", capturable=True)
    step_fn = TrainStep(model, loss_mod, opt_g, opt_d, te, make_autocast(torch.device("cpu"), "none", True), cfg)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(step_fn)


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


def _run_steps(quantizer, amp, steps, disc_start, graphed, step_cls=None, **graph_kw):
    """``steps`` training steps on a fresh tiny model (same seed each call), eagerly or through GraphedTrainStep;
    returns (per-step losses and indices, final model state, the GraphedTrainStep or the eager TrainStep).
    ``step_cls``: a TrainStep subclass to run instead."""
    from lgvq_fast.data.collate import mix_seed
    from lgvq_fast.training.cuda_graph import GraphedTrainStep

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg, te, model, loss_mod = tiny_setup(quantizer, device="cuda", perceptual=True, disc_start=disc_start,
                                           mtp_dropout=0.1)
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-3, (0.5, 0.9), dev, capturable=True)
    step_fn = (step_cls or TrainStep)(model, loss_mod, opt_g, opt_d, te, make_autocast(dev, "bf16" if amp else "none",
                                                                                      True), cfg)
    # "global": no DataLoader thread here, so police every thread's CUDA calls during the capture
    runner = GraphedTrainStep(step_fn, **{"warmup": 2, "capture_error_mode": "global", **graph_kw}) if graphed \
        else step_fn
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = (torch.rand(4, 3, cfg.resolution, cfg.resolution, generator=gen) * 2 - 1).to(dev)
        text = text_batch(te, 4, cfg.max_text_len, seed=step).fixed_size()
        torch.manual_seed(mix_seed(0, 0, step))
        out, logs = runner(x, text, step)
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
    steps = 9
    eager_losses, eager_state, _ = _run_steps(quantizer, amp, steps, 5, graphed=False)
    graph_losses, graph_state, runner = _run_steps(quantizer, amp, steps, 5, graphed=True)
    assert runner.captures == 2 and runner.replays == steps - 2 * 2 and runner.capture_error is None
    _assert_same_run((eager_losses, eager_state), (graph_losses, graph_state), amp)


@pytest.mark.gpu
@_fixed_cuda_numerics()
def test_failed_capture_goes_on_eagerly():
    """eager_on_capture_error (the trainer's train.cuda_graph=auto): a host read inside the captured step makes
    the capture fail; the step runs again eagerly with the same random numbers, the later steps run eagerly, and
    the run equals the eager one. Without the flag the error propagates."""
    steps = 5
    eager_losses, eager_state, _ = _run_steps("vq", False, steps, 0, graphed=False)

    class SyncingStep(TrainStep):
        def __call__(self, *args):
            out = super().__call__(*args)
            if torch.cuda.is_current_stream_capturing():
                float(out[1]["total"])  # a host read: not allowed while capturing
            return out

    messages = []
    graph_losses, graph_state, runner = _run_steps("vq", False, steps, 0, graphed=True, step_cls=SyncingStep,
                                                   eager_on_capture_error=True, log=messages.append)
    assert runner.captures == 0 and runner.replays == 0 and runner.capture_error
    assert len(messages) == 1 and "goes on without the graph" in messages[0]
    _assert_same_run((eager_losses, eager_state), (graph_losses, graph_state), amp=False)
    with pytest.raises(RuntimeError):
        _run_steps("vq", False, 3, 0, graphed=True, step_cls=SyncingStep)


@pytest.mark.gpu
def test_tiny_run_on_gpu_with_cuda_graph(tmp_path):
    """train.cuda_graph in the trainer (pinned DataLoader batches from worker processes): warm-up, a capture after
    disc_start, replays; resuming an eager run's checkpoint with the default ("auto": captured, channels_last),
    then a graph run's with the graph asked for."""
    out = tmp_path / "graph"
    common = ["--device", "cuda", "--set", "model.quantizer_kwargs={}", "--num-workers", "2"]
    # eager, fused Adam that is not capturable
    summary = run_tiny(out, "--steps", "4", "--set", "train.cuda_graph=false", "--set", "train.channels_last=true",
                   *common)
    assert summary["step"] == 4 and "cuda_graph" not in summary
    summary = run_tiny(out, "--steps", "12", "--resume", "auto", *common)
    # steps 4-6 warm up, step 7 is captured and replayed, then 8-11 replayed
    assert summary["step"] == 12 and summary["cuda_graph"] == {"captures": 1, "replays": 5}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["cuda_graph"] is True and config["train"]["channels_last"] is True
    logged = [r for r in rows(out) if "total" in r]
    assert len(logged) == 12 and all(torch.isfinite(torch.tensor(r["total"])) for r in logged)
    assert all("d_loss" in r for r in logged[2:])  # the captured phase trains the discriminator
    summary = run_tiny(out, "--steps", "16", "--resume", "auto", "--set", "train.cuda_graph=true", *common)
    assert summary["step"] == 16 and summary["cuda_graph"] == {"captures": 1, "replays": 1}
    state = CheckpointIO.load(CheckpointIO(str(out)).latest())
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
