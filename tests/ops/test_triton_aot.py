"""Every Triton kernel compiles for sm_90a through Triton's real pipeline (PTX + cubin), without a GPU.

The interpreter tests check what the kernels compute; this checks that they lower at all, at every constexpr
variant the launchers produce, within Hopper's shared memory (scripts/triton_aot_check.py).
"""
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "triton_aot_check.py")


def _nvidia_backend():
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return os.access(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"), os.X_OK)


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--max-configs", "1"], capture_output=True,
                          text=True, env=env, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    for kernel in ("_nearest_code_fwd_kernel", "_certify_kernel", "_prep_rows_kernel", "_f64_search_kernel",
                   "_code_stats_kernel", "_code_prep_kernel", "_distance_kernel", "_settle_kernel",
                   "_code_norms_kernel",
                   "_code_normalize_kernel",
                   "_ema_cluster_size_kernel", "_ema_embed_kernel", "_ema_scatter_kernel", "_ema_chunk_kernel",
                   "_ema_fixup_kernel", "_relation_loss_fwd_kernel", "_relation_loss_bwd_kernel",
                   "_relation_loss_scatter_kernel", "_relation_loss_reduce_kernel"):
        assert any(kernel + "[" in line for line in compiled), f"{kernel} was never compiled:\n{out[-4000:]}"
    # every constexpr variant of the search kernel the launchers pick
    for variant in ("FAST=False, SPLIT_BF16=False", "FAST=False, SPLIT_BF16=True", "FAST=True, SPLIT_BF16=False"):
        for cos in ("IS_COS=False", "IS_COS=True"):
            assert any(f"{cos}, {variant}" in line for line in compiled), f"{cos}, {variant} missing"
    assert any("ONE_D_TILE=True" in line for line in compiled) and any("ONE_D_TILE=False" in line for line in compiled)
    # the TMA fast path: its operand copies, and a search that loads through TMA and multiplies with wgmma
    assert any("_bf16_rows_kernel[" in line for line in compiled), "_bf16_rows_kernel was never compiled"
    tma = [line for line in compiled if "_nearest_code_tma_kernel[" in line]
    assert tma, f"_nearest_code_tma_kernel was never compiled:\n{out[-4000:]}"
    assert all("mma wgmma" in line and "loads tma" in line for line in tma), "\n".join(tma)
    for cos in ("IS_COS=False", "IS_COS=True"):
        assert any(cos in line for line in tma), f"TMA kernel: {cos} missing"


def test_aot_check_reports_a_kernel_that_does_not_compile(tmp_path):
    """The checker itself fails loudly: a kernel with a type error is reported and the exit status is 1."""
    if not _nvidia_backend():
        pytest.skip("needs triton with its NVIDIA backend (ptxas)")
    kernel = tmp_path / "broken_kernels.py"
    kernel.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef _broken(x_ptr, N, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    x = tl.load(x_ptr + offs, mask=offs < N)\n"
        "    tl.store(x_ptr + offs, tl.dot(x, x), mask=offs < N)\n"  # tl.dot needs 2-D blocks: a compile error
    )
    driver = tmp_path / "drive.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.argv = [{SCRIPT!r}]\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"spec = __import__('importlib.util').util.spec_from_file_location('aot', {SCRIPT!r})\n"
        "aot = __import__('importlib.util').util.module_from_spec(spec); spec.loader.exec_module(aot)\n"
        "import torch, broken_kernels\n"
        "c = aot.Compiler(90, None); aot.intercept(c)\n"
        "broken_kernels._broken[(1,)](torch.zeros(64), 64, BLOCK=64)\n"
        "print('FAILURES', len(c.failures))\n"
    )
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=env, timeout=300)
    assert "FAILURES 1" in proc.stdout, proc.stdout + proc.stderr
    assert "FAIL _broken[BLOCK=64]" in proc.stdout
