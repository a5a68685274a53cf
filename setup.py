"""Build script: installs lgvq_fast with the top-level kernels/ as lgvq_fast.kernels.

The optional CUDA extension lgvq_fast._C (csrc/, built by CMake) is controlled by
LGVQ_FAST_BUILD_CUDA: ``auto`` (default; build when nvcc is found), ``1`` (build
or fail loudly), ``0`` (skip).
"""
from setuptools import setup

PACKAGES = [
    "lgvq_fast",
    "lgvq_fast.ops",
    "lgvq_fast.reference",
    "lgvq_fast.models",
    "lgvq_fast.data",
    "lgvq_fast.kernels",
]

setup(
    packages=PACKAGES,
    package_dir={"lgvq_fast.kernels": "kernels"},
)
