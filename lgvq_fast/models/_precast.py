"""Cast a model's convolution weights to the autocast dtype in one batched op per step.

Under autocast every ``F.conv2d`` casts its fp32 weight and bias to bf16 (one kernel each) and, in the
backward, casts their bf16 gradients back to fp32 (one more each): about 300 small launches a step for the
VQGAN at the paper shape, on a step that is close to launch-bound. ``precast_weights`` instead
concatenates the weights and biases of the given ``vqgan.Conv2d`` modules in memory order (each padded to
a 64-byte boundary), casts the concatenation once and hands each module views of it for this forward. The backward then has one
concatenation of the bf16 gradients and one cast back, and each parameter receives a view of the fp32
result in its own memory layout. The values are the same as autocast's: the same round-to-nearest cast
of the same weights, and the same bf16 gradients cast back. Only parameters that are fp32 and contiguous
(NCHW or channels_last) on the autocast device take part; the rest keep autocast's per-call casts.
"""
import contextlib

import torch

_LOW = (torch.bfloat16, torch.float16)
# each weight starts at a multiple of this many elements (64 bytes in bf16), so cuDNN sees the alignment of
# a freshly allocated tensor and keeps its vectorised kernels
ALIGN = 32


def _memory_order(p):
    """A flat view of ``p`` in memory order and the function that rebuilds p's layout from such a vector."""
    if p.is_contiguous():
        return p.view(-1), lambda t: t.view(p.shape)
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        nhwc = p.permute(0, 2, 3, 1)
        return nhwc.reshape(-1), lambda t: t.view(nhwc.shape).permute(0, 3, 1, 2)
    return None, None


@contextlib.contextmanager
def precast_weights(modules, device_type):
    """While active, each module in ``modules`` (``vqgan.Conv2d``) convolves with its weight and bias cast to
    the autocast dtype by one shared cast. A no-op outside a 16-bit autocast and while torch.compile traces."""
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if dtype not in _LOW or not modules or torch.compiler.is_compiling():
        yield
        return
    flats, rebuilds, owners = [], [], []
    for m in modules:
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is None or p.dtype != torch.float32 or p.device.type != device_type:
                continue
            flat, rebuild = _memory_order(p)
            if flat is not None:
                flats.append(flat)
                rebuilds.append(rebuild)
                owners.append((m, name))
    if not flats:
        yield
        return
    pad = flats[0].new_zeros(ALIGN - 1)
    parts, sizes, keep = [], [], []
    for f in flats:
        keep.append(len(parts))
        parts.append(f)
        sizes.append(f.numel())
        if f.numel() % ALIGN:
            parts.append(pad[: ALIGN - f.numel() % ALIGN])
            sizes.append(parts[-1].numel())
    pieces = torch.cat(parts).to(dtype).split(sizes)
    for m in modules:
        m._lowp = {}
    for (m, name), rebuild, i in zip(owners, rebuilds, keep):
        m._lowp[name] = rebuild(pieces[i])
    try:
        yield
    finally:
        for m in modules:
            m._lowp = None
