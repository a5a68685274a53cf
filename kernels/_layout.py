"""Layout helpers shared by the kernels that read [N, C, H, W] tensors as [N, H*W, C] through strides
(GroupNorm, LPIPS): NCHW and channels_last tensors both fold H and W into one index."""
import triton
import triton.language as tl


def hw_strides(t):
    """(stride_n, stride_hw, stride_c) of a [N, C, H, W] tensor whose H, W fold into one index."""
    return t.stride(0), t.stride(3), t.stride(1)


@triton.jit
def load_tile(ptr, pid_n, offs_hw, offs_c, mask, stride_n, stride_hw, stride_c):
    """The [len(offs_hw), len(offs_c)] tile of sample ``pid_n``, as fp32 (masked elements 0)."""
    ptrs = ptr + pid_n * stride_n + offs_hw[:, None] * stride_hw + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, val, pid_n, offs_hw, offs_c, mask, stride_n, stride_hw, stride_c):
    """Store a tile in ``ptr``'s dtype."""
    ptrs = ptr + pid_n * stride_n + offs_hw[:, None] * stride_hw + offs_c[None, :] * stride_c
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)
