"""VQGAN encoder and decoder (the taming-transformers layout the paper uses, spec §1.1).

GroupNorm(32, eps 1e-6) with the swish after it (one fused op on CUDA, see GroupNorm), ResnetBlock, single-head
spatial AttnBlock, strided-conv Downsample and nearest Upsample + conv. The encoder has ``num_res_blocks``
blocks per level, the decoder ``num_res_blocks + 1``; attention is added at the levels whose resolution is in
``attn_resolutions`` and always in the middle block. The downsampling factor is ``2 ** (len(ch_mult) - 1)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lgvq_fast.reference.group_norm import centred_group_norm, channels_last_only

NORM_IMPLS = ("auto", "native", "triton")
# "auto" fuses GroupNorm + swish only for channels_last maps of at least this many positions (GroupNorm's docstring
# has the measurements behind it).
FUSED_MIN_HW = 256 * 256


def fused_by_default(x: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` takes the fused op for a CUDA ``x [N, C, H, W]``: channels_last and H * W >=
    ``FUSED_MIN_HW``."""
    return channels_last_only(x) and x.shape[2] * x.shape[3] >= FUSED_MIN_HW


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that stays in the autocast dtype and can apply the following swish itself.

    ``forward(x, act=True)`` is ``swish(norm(x))``. Two paths:

    * fused: ``lgvq_fast.ops.group_norm`` with ``impl="triton"`` (statistics in fp32, output in x's dtype and
      memory format, SiLU in the same pass, fp32 weights read directly). Taken on CUDA when ``impl`` is
      ``"triton"``, or when it is ``"auto"``, x is channels_last (PyTorch's CUDA GroupNorm has no NHWC kernel
      and converts the tensor both ways) and the map has at least ``FUSED_MIN_HW`` positions. The crossover,
      measured on an H200 (``bench/results/group_norm/nvidia_h200.json``, forward + backward, bf16,
      channels_last, against PyTorch with its conversions): the fused op is 2.81x faster at 8x128x256x256 but
      0.35x at 8x256x64x64 and 0.23x at 8x512x16x16, so "auto" fuses from 256 x 256 positions on and uses
      PyTorch below (128 x 128, between the two, is not measured yet). In NCHW it is never taken under "auto"
      (0.91x at 256 x 256). Never while torch.compile traces: inductor generates its own fused norm.
    * native: autocast runs ``group_norm`` in fp32 and returns fp32, so every normalised activation would be
      written, read by swish and read again by the next convolution at twice the bf16 size. Under autocast
      this normalises the low-precision tensor directly (PyTorch accumulates its statistics in fp32) and
      returns that dtype; the next convolution casts to it anyway. Outside autocast it is ``nn.GroupNorm``.
    """

    impl = "auto"

    def _fused(self, x):
        if self.impl == "native" or x.dim() != 4 or x.shape[0] == 0 or torch.compiler.is_compiling():
            return False
        from lgvq_fast._backend import triton_available, triton_interpret
        from lgvq_fast.ops.group_norm import triton_supports

        if not (x.is_cuda or (self.impl == "triton" and x.device.type == "cpu" and triton_interpret())):
            return False
        if not (triton_available() and triton_supports(self.num_channels, self.num_groups)):
            return False
        return self.impl == "triton" or fused_by_default(x)

    def forward(self, x, act=False):
        device_type = x.device.type
        low = None
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            low = dtype if dtype in (torch.bfloat16, torch.float16) else None
        if self._fused(x):
            from lgvq_fast.ops.group_norm import group_norm_triton

            with torch.autocast(device_type, enabled=False):
                return group_norm_triton(x if low is None else x.to(low), self.weight, self.bias, self.num_groups,
                                         self.eps, act)
        # PyTorch's CPU GroupNorm takes a channels-last input's variance as E[x^2] - E[x]^2 (digits lost when a
        # group's mean is large against its spread): on the CPU the statistics come from an NCHW copy
        norm = centred_group_norm if device_type == "cpu" else F.group_norm
        if low is None:
            y = norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            with torch.autocast(device_type, enabled=False):
                y = norm(x.to(low), self.num_groups, self.weight.to(low), self.bias.to(low), self.eps)
        return swish(y) if act else y


def set_norm_impl(module: nn.Module, impl: str) -> dict:
    """Set ``impl`` ("auto", "native" or "triton") on every VQGAN GroupNorm in ``module``; returns the previous
    values by module, for :func:`restore_norm_impl`."""
    if impl not in NORM_IMPLS:
        raise ValueError(f"norm impl must be one of {NORM_IMPLS}, got {impl!r}")
    previous = {}
    for m in module.modules():
        if isinstance(m, GroupNorm):
            previous[m] = m.impl
            m.impl = impl
    return previous


def restore_norm_impl(previous: dict) -> None:
    for m, impl in previous.items():
        m.impl = impl


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that can use a weight and bias cast ahead of time for the current forward
    (``lgvq_fast.models._precast.precast_weights`` sets ``_lowp``; missing entries fall back to the parameter)."""

    _lowp = None

    def forward(self, x):
        lowp = self._lowp
        if not lowp:
            return super().forward(x)
        return self._conv_forward(x, lowp.get("weight", self.weight), lowp.get("bias", self.bias))


def normalize(channels: int) -> nn.GroupNorm:
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x) as one kernel each way (the two-op form writes and saves an extra full-size tensor)
    return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(self.norm1(x, act=True))
        h = self.conv2(self.dropout(self.norm2(h, act=True)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, 1, HW, C]: one head over all spatial positions (views of both NCHW and channels_last maps)
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding keeps the output exactly half the input size
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_ch(ch, ch_mult):
    for m in ch_mult:
        if (ch * m) % 32:
            raise ValueError(f"ch * ch_mult must be multiples of 32 for GroupNorm(32); got ch={ch}, ch_mult={ch_mult}")


class Encoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 in_channels=3, resolution=256, z_channels=256, dropout=0.0):
        super().__init__()
        _check_ch(ch, ch_mult)
        self.num_levels = len(ch_mult)
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_levels):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_in = ch * in_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != self.num_levels - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_levels - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out(h, act=True))


class Decoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 out_ch=3, resolution=256, z_channels=256, dropout=0.0):
        super().__init__()
        _check_ch(ch, ch_mult)
        self.num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        # built from the lowest resolution up, stored by level index so names match the encoder's
        up = []
        for level in reversed(range(self.num_levels)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(block_in)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(h, act=True))
