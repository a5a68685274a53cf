"""The training step captured into a CUDA graph (``train.cuda_graph``: "auto", the default, captures it
wherever it can run; ``true`` requires it).

At the paper shape the eager step launches a few thousand kernels, many of them small, so the host's launch
work is close to the GPU's compute time. ``GraphedTrainStep`` records a :class:`~lgvq_fast.training.step.TrainStep`
(text encoder, generator forward and backward, adaptive GAN weight, both optimizer updates) into one CUDA graph and
replays it for every batch: one launch per step. The numbers are those of the eager step: the same kernels in
the same order, and dropout draws the same numbers (a replay reads the CUDA generator's seed and offset, which
the trainer sets per step with ``torch.manual_seed``).

What a captured step needs, checked when the object is built or at the first call:

* CUDA and a single process (DDP's gradient hooks are not captured here);
* no host synchronisation inside the step: no dead-code restart (``threshold_ema_dead_code`` must be 0; it
  counts the dead codes on the host) and no ``check_finite`` in the quantizer;
* Adam built with ``capturable=True`` (``training.step.make_optimizers(..., capturable=True)``), a constant
  learning rate;
* fixed shapes: the images' shape and layout, and text batches of one length. The masked-text positions vary
  in number from batch to batch, so each text batch is given a predict index of fixed length B * L
  (:meth:`TextBatch.fixed_size`: the filler entries weigh 0, the loss is unchanged);
* autocast without its weight-cast cache (``cache_enabled=False``, ``training.step.make_autocast(...,
  cuda_graph=True)``), which a captured region may not keep.

The step's Python-level branches become part of the graph, so there is one graph per phase: before
``disc_start`` (no discriminator update) and from it on. The first ``warmup`` steps of a phase run eagerly
on a side stream (cuDNN and Triton autotuning, optimizer state, lazily created workspaces), the next one is
captured and every later one replayed. A batch whose shapes differ from the captured ones (for instance a
short last batch) runs eagerly. The outputs and logs a replay returns are the graph's static tensors:
read them (or clone them) before the next step overwrites them.
"""
import warnings

import torch

from lgvq_fast.training.step import TrainStep


class GraphedTrainStep:
    """A :class:`TrainStep` replayed from a CUDA graph, called like it: ``out, logs = graphed(x, text, step)``."""

    def __init__(self, step_fn: TrainStep, warmup=3, capture_error_mode="thread_local", eager_on_capture_error=False,
                 log=print):
        _check_capturable(step_fn, warmup)
        self.step_fn = step_fn
        self.warmup, self.device = int(warmup), next(step_fn.raw_model.parameters()).device
        # "thread_local" (default): a DataLoader pin-memory thread allocating pinned memory during the capture
        # must neither fail nor invalidate it (the autograd thread's kernels on the capture stream are recorded
        # either way); "global" also polices the other threads, for tests without a DataLoader
        self.capture_error_mode = capture_error_mode
        self.stream = torch.cuda.Stream(self.device)
        self.phase = None  # disc_active of the captured (or warming) phase
        self.eager_steps = 0  # eager steps run in the current phase
        self.graph = None
        self.static = None  # (x, text) the graph reads
        self.outputs = None  # (out, logs) the graph writes
        self.replays = 0
        self.captures = 0
        # eager_on_capture_error: a capture that raises is reported through ``log`` and every later step runs
        # eagerly (the failed step too: nothing of it ran during the capture); otherwise the error propagates
        self.eager_on_capture_error, self.log = bool(eager_on_capture_error), log
        self.capture_error = None  # "Type: message" of the failed capture, then the object stays eager

    def _step(self, x, text, step):
        return self.step_fn(x, text, step)

    def _signature(self, x, text):
        sig = (tuple(x.shape), x.stride(), x.dtype)
        if text is not None:
            sig += tuple((tuple(t.shape), t.dtype) for t in _text_tensors(text))
        return sig

    def _eager(self, x, text, step):
        """A step outside the graph, on the side stream (as warm-up for capture must run)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out, logs = self._step(x, text, step)
        current.wait_stream(self.stream)
        return out, logs

    def _capture(self, x, text, step):
        static_x = x.clone()
        static_text = None
        if text is not None:
            static_text = text.to(self.device).apply(torch.clone)
        # drop the previous phase's graph (and its memory pool) before recording the next one
        self.graph = self.static = self.outputs = None
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode=self.capture_error_mode):
            outputs = self._step(static_x, static_text, step)
        current.wait_stream(self.stream)
        self.graph, self.static, self.outputs = graph, (static_x, static_text), outputs
        self.signature = self._signature(static_x, static_text)
        self.captures += 1

    def _recover(self, rng):
        """After a failed capture: nothing of the step ran, so it runs again eagerly with the random numbers it
        would have drawn. A capture ended by an error skips the CUDA generator's capture epilogue; an empty
        capture runs it, then the generators get back their state from before the attempt."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "The CUDA Graph is empty": it is meant to be
                empty = torch.cuda.CUDAGraph()
                with torch.cuda.graph(empty, stream=self.stream):
                    pass
            del empty
        except Exception:  # the generator state is set below either way
            pass
        torch.cuda.synchronize(self.device)
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)

    def __call__(self, x, text, step):
        if x.device != self.device:
            raise ValueError(f"GraphedTrainStep: x is on {x.device}, the model on {self.device}")
        if text is not None and self.step_fn.mcfg.use_text_losses:
            if text.predict_weight() is None:
                # the masked-position count varies per batch: pad its index (on the host, before the copy; a
                # pinned batch, as the trainer's DataLoader gives, stays pinned so the copies stay asynchronous)
                text = text.fixed_size()
        else:
            text = None
        if self.capture_error is not None:  # a capture failed: every step from then on runs eagerly
            return self._step(x, text, step)
        phase = bool(self.step_fn.disc_active(step))
        if phase != self.phase:
            self.phase, self.eager_steps, self.graph, self.static, self.outputs = phase, 0, None, None, None
        if self.graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self._eager(x, text, step)
        if self.graph is None:
            rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
            try:
                self._capture(x, text, step)
            except Exception as e:
                if not self.eager_on_capture_error:
                    raise
                self.capture_error = f"{type(e).__name__}: {e}"
                self.log(f"train.cuda_graph: capturing the step failed ({self.capture_error.splitlines()[0][:300]}); "
                         "the run goes on without the graph (set train.cuda_graph=false to skip the attempt)")
                self._recover(rng)
                return self._step(x, text, step)
        elif self._signature(x, text) != self.signature:
            return self._eager(x, text, step)
        static_x, static_text = self.static
        static_x.copy_(x, non_blocking=True)
        if text is not None:
            for dst, src in zip(_text_tensors(static_text), _text_tensors(text)):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        out, logs = self.outputs
        # shallow copies: a caller adding keys must not change what the next replay returns
        return dict(out), dict(logs)


def _check_capturable(step_fn, warmup):
    """What a captured step needs and the object can see before the first call (module docstring)."""
    device = next(step_fn.raw_model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"train.cuda_graph needs the model on a CUDA device, it is on {device}")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("train.cuda_graph runs a single process; DDP steps are not captured (use it with "
                         "--nproc_per_node=1)")
    if int(warmup) < 1:
        raise ValueError(f"GraphedTrainStep: warmup must be >= 1 (cuDNN/Triton autotuning and the optimizer "
                         f"state must exist before capture), got {warmup}")
    quantizer = step_fn.raw_model.quantizer
    if getattr(quantizer, "threshold_ema_dead_code", 0) > 0:
        raise ValueError("train.cuda_graph: the dead-code restart (threshold_ema_dead_code > 0) counts the dead "
                         "codes on the host every step, which a CUDA graph cannot capture; set it to 0")
    if getattr(quantizer, "check_finite", False):
        raise ValueError("train.cuda_graph: the quantizer's check_finite reads a flag on the host every step; "
                         "turn it off (the trainer checks the losses for NaN on the device)")
    for name, opt in (("opt_g", step_fn.opt_g), ("opt_d", step_fn.opt_d)):
        if not all(group.get("capturable", False) for group in opt.param_groups):
            raise ValueError(f"train.cuda_graph: {name} must be built with capturable=True "
                             "(lgvq_fast.training.step.make_optimizers(..., capturable=True))")
    probe = step_fn.autocast()
    if getattr(probe, "_enabled", False) and getattr(probe, "_cache_enabled", False):
        raise ValueError("train.cuda_graph: autocast must be built with cache_enabled=False (its weight-cast "
                         "cache may not outlive a captured region)")


def _text_tensors(text):
    return (text.input_ids, text.pad_mask, text.mlm_mask, text.predict_index(), text.predict_weight())
