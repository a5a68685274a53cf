"""CI compile check of the CUDA extension lgvq_fast._C, plus its CPU-side argument checks.

On a machine with nvcc the install builds lgvq_fast._C (setup.py, LGVQ_FAST_BUILD_CUDA=auto);
these tests then check that it imports without a GPU (static CUDA runtime), that it holds
sm_90a and sm_80 machine code, and that bad arguments raise errors naming them; on a GPU,
the glue's row strides and the machine code the device loads. The kernels themselves are
checked against float64 in the op tests (tests/ops/test_nearest_code.py, tests/ops/test_ema.py).
"""
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from lgvq_fast import _backend

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_setup():
    spec = importlib.util.spec_from_file_location("lgvq_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_setup()
NVCC = SETUP.find_nvcc()
BUILD_MODE = os.environ.get("LGVQ_FAST_BUILD_CUDA", "auto")

needs_ext = pytest.mark.skipif(
    NVCC is None or BUILD_MODE == "0",
    reason="nvcc not found (or LGVQ_FAST_BUILD_CUDA=0), so the CUDA extension is not built here",
)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CUDA failures on a machine without a GPU")


def _find_cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [pathlib.Path(os.environ.get(v, "")) / "bin" / "cuobjdump" for v in ("CUDA_HOME", "CUDA_PATH")]
    candidates.append(pathlib.Path("/usr/local/cuda/bin/cuobjdump"))
    if NVCC:
        candidates.append(pathlib.Path(NVCC).resolve().parent / "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        # Triton's wheel carries its own cuobjdump.
        candidates.append(pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _ext():
    return importlib.import_module("lgvq_fast._C")


def test_build_decision_modes(tmp_path):
    assert SETUP.cuda_build_decision({"LGVQ_FAST_BUILD_CUDA": "0"})[0] is False
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for mode in ("auto", "1", ""):
        build, nvcc, _ = SETUP.cuda_build_decision({"LGVQ_FAST_BUILD_CUDA": mode, "PATH": str(tmp_path)})
        assert build and nvcc == str(fake)
    with pytest.raises(RuntimeError, match="LGVQ_FAST_BUILD_CUDA"):
        SETUP.cuda_build_decision({"LGVQ_FAST_BUILD_CUDA": "yes"})


def test_build_decision_without_nvcc(tmp_path):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("/usr/local/cuda/bin/nvcc exists, so nvcc is always found here")
    env = {"PATH": str(tmp_path)}
    assert SETUP.cuda_build_decision({**env, "LGVQ_FAST_BUILD_CUDA": "auto"})[0] is False
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        SETUP.cuda_build_decision({**env, "LGVQ_FAST_BUILD_CUDA": "1"})


@needs_ext
def test_extension_imports_without_gpu():
    assert _backend.cuda_ext_import_error() is None, _backend.cuda_ext_import_error()
    assert _backend.cuda_ext_available()
    ext = _ext()
    assert ext.compiled_archs() == ["sm_90a", "sm_80"]
    assert ext.cuda_runtime_version() >= 13000
    assert ext.padded_dim(8) == 16 and ext.padded_dim(77) == 80 and ext.padded_dim(256) == 256


@needs_ext
def test_extension_holds_sm90a_machine_code():
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's backends/nvidia/bin)")
    out = subprocess.run([cuobjdump, "--list-elf", _ext().__file__], capture_output=True, text=True, check=True)
    listing = out.stdout + out.stderr
    for name in ("nearest_code", "ema"):
        for arch in ("sm_90a", "sm_80"):
            assert f"{name}.{arch}.cubin" in listing, listing


@needs_ext
def test_extension_needs_no_shared_cudart():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not found")
    out = subprocess.run([ldd, _ext().__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in out and "libtorch" not in out, out


def test_resolve_impl_cuda_on_cpu_raises():
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        _backend.resolve_impl("nearest_code", "cuda", torch.device("cpu"))


@needs_ext
def test_glue_rejects_cpu_tensors():
    from lgvq_fast import _cuda

    z, codebook = torch.randn(10, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="nearest_code: z must be a CUDA tensor"):
        _cuda.nearest_code(z, codebook)
    with pytest.raises(ValueError, match="nearest_code: z must be a torch.Tensor"):
        _cuda.nearest_code(z.numpy(), codebook)
    cluster_size, embed = torch.rand(5), torch.randn(5, 8)
    with pytest.raises(ValueError, match="ema_update_: cluster_size must be a CUDA tensor"):
        _cuda.ema_update_(cluster_size, embed.clone(), embed, z, torch.randint(0, 5, (10,)), 0.99, 1e-5)


def _nearest_args(**over):
    # Aligned, non-null fake addresses: the checks run before any CUDA call.
    args = dict(z=4096, z_dtype=0, n=10, d=8, z_row_stride=8, codebook=8192, k=5, e_hi=16384, e_lo=32768,
                e_norm2=65536, indices=131072, distances=262144, metric=0, algo=1, eps=1e-12, device=0, stream=0)
    args.update(over)
    return args


@needs_ext
@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(z_dtype=7), "z_dtype"),
        (dict(n=-1), "n must"),
        (dict(d=0), "d must"),
        (dict(k=0), "k must"),
        (dict(z_row_stride=4), "z_row_stride"),
        (dict(metric=3), "metric"),
        (dict(algo=9), "algo"),
        (dict(eps=-1.0), "eps"),
        (dict(device=-1), "device"),
        (dict(codebook=0), "codebook"),
        (dict(z=4098), "z must be 4-byte aligned"),
        (dict(e_hi=4104), "e_hi must be 16-byte aligned"),
        (dict(e_lo=0), "e_lo is a null pointer"),
        (dict(indices=0), "indices is a null pointer"),
        (dict(algo=3, e_lo=0, d=513, z_row_stride=513), "algo 3 \\(fast_tma\\) takes d <= 512"),
        (dict(algo=3, e_lo=0), "z_hi is a null pointer"),
        (dict(algo=3, e_lo=0, n=2**31, z_hi=65536 * 8, z_aux=8), "n < 2\\^31"),
        (dict(algo=3, e_lo=0, z_hi=65540, z_aux=8), "z_hi must be 16-byte aligned"),
        (dict(algo=3, e_lo=0, z_hi=65536 * 8), "z_aux is a null pointer"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_extension_nearest_code_checks_arguments(bad, name):
    with pytest.raises(ValueError, match=name):
        _ext().nearest_code(**_nearest_args(**bad))


@needs_ext
def test_extension_tma_workspace_rows():
    """algo 3 (fast_tma) pads rows to one 16- or 32-wide chunk for small D, else to 64-wide chunks, up to 512."""
    ext = _ext()
    want = {1: 16, 8: 16, 16: 16, 17: 32, 32: 32, 33: 64, 64: 64, 77: 128, 256: 256, 300: 320, 512: 512}
    assert {d: ext.tma_padded_dim(d) for d in want} == want
    assert ext.tma_max_dim() == 512 and ext.ALGO_CODES["fast_tma"] == 3


@needs_ext
def test_extension_ema_checks_arguments():
    ext = _ext()
    args = dict(cluster_size=4096, embed_avg=8192, embed=16384, embed_dtype=0, k=5, d=8, z=32768, z_dtype=1, n=10,
                z_row_stride=8, perm=65536, offsets=131072, decay=0.99, eps=1e-5, device=0, stream=0)
    with pytest.raises(ValueError, match="decay"):
        ext.ema_update(**{**args, "decay": 1.5})
    with pytest.raises(ValueError, match="offsets is a null pointer"):
        ext.ema_update(**{**args, "offsets": 0})
    with pytest.raises(ValueError, match="embed_dtype"):
        ext.ema_update(**{**args, "embed_dtype": 3})
    with pytest.raises(ValueError, match="perm must be 8-byte aligned"):
        ext.ema_update(**{**args, "perm": 65540})


@needs_ext
@cpu_only
def test_extension_raises_runtime_error_without_gpu():
    with pytest.raises(RuntimeError, match="lgvq_fast._C"):
        _ext().nearest_code(**_nearest_args())


@pytest.mark.gpu
@pytest.mark.skipif(not _backend.cuda_ext_available(),
                    reason=f"the compiled extension is not built: {_backend.cuda_ext_import_error()}")
def test_glue_row_stride_and_machine_code_on_gpu():
    from lgvq_fast import _C, _cuda

    z = torch.randn(1000, 77, device="cuda").to(torch.bfloat16)
    codebook = torch.randn(1000, 77, device="cuda")
    wide = torch.zeros(1000, 100, device="cuda", dtype=z.dtype)
    wide[:, :77] = z
    a = _cuda.nearest_code(z, codebook, "cos", "exact")
    b = _cuda.nearest_code(wide[:, :77], codebook, "cos", "exact")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    major, minor = torch.cuda.get_device_capability()
    version = _C.nearest_code_binary_version(torch.cuda.current_device())
    assert version == (90 if (major, minor) == (9, 0) else 80 if major == 8 else version)
