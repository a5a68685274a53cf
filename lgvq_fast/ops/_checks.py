"""Argument checks shared by the public ops (each error names the argument), and their input-layout helper."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(op, name, t, *, dtypes=None, ndim=None, min_ndim=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(op, **tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_binary_mask(op, name, t):
    """Raise unless the float mask ``t`` holds only 0 and 1 (a bool mask cannot hold anything else: no check).

    Reading a value on the host costs a device sync, and is not allowed at all while a CUDA graph is being
    captured. So a mask on the CPU in eager mode is checked on the host (ValueError naming ``name``); anywhere
    else (a CUDA mask, or while ``torch.compile`` traces) the check is queued with ``torch._assert_async``: no
    sync, capturable, and a bad value fails at the next sync -- on CUDA as a device-side assert, which leaves the
    CUDA context unusable (as an out-of-range index does). Hot paths pass bool masks and pay nothing.
    """
    if t.dtype == torch.bool or t.numel() == 0 or t.device.type == "meta":
        return
    ok = ((t == 0) | (t == 1)).all()
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            bad = t[(t != 0) & (t != 1)][0].item()
            raise ValueError(f"{op}: {name} must hold only 0 and 1 (or be a bool tensor), got the value {bad}")
        return
    torch._assert_async(ok, f"{op}: {name} must hold only 0 and 1 (or be a bool tensor)")


def check_finite(op, name, t):
    """Raise if ``t`` holds NaN or inf (costs one reduction; used on small inputs or on request)."""
    if t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains NaN or inf")


def foldable_hw(t):
    """``t`` [N, C, H, W] whose H and W fold into one index (NCHW- or channels_last-dense, or broadcast), as the
    GroupNorm and LPIPS kernels read it; anything else is copied to NCHW."""
    if t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3):
        return t
    return t.contiguous()
