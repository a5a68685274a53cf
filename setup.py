"""Build script: installs lgvq_fast with the top-level kernels/ as lgvq_fast.kernels.

The optional CUDA extension lgvq_fast._C (csrc/, built by CMake with ninja) is
controlled by LGVQ_FAST_BUILD_CUDA:
``auto`` (default): build when nvcc is found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin,
/usr/local/cuda/bin); a build that then fails fails the install, so a kernel
that no longer compiles cannot pass CI unnoticed.
``1``: build, and fail loudly when nvcc is missing.
``0``: skip the extension.
Compile flags live in CMakeLists.txt only.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

PACKAGES = [
    "lgvq_fast",
    "lgvq_fast.ops",
    "lgvq_fast.reference",
    "lgvq_fast.models",
    "lgvq_fast.data",
    "lgvq_fast.training",
    "lgvq_fast.compat",
    "lgvq_fast.downstream",
    "lgvq_fast.kernels",
]

BUILD_MODES = ("auto", "1", "0")


def find_nvcc(env=None):
    """Path of nvcc, or None: PATH first, then the usual CUDA install folders."""
    env = os.environ if env is None else env
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for base in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            cand = os.path.join(base, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


def cuda_build_decision(env=None):
    """Return ``(build, nvcc_path, reason)`` for LGVQ_FAST_BUILD_CUDA in ``env``.

    Raises RuntimeError for an unknown mode, or for mode ``1`` without nvcc.
    """
    env = os.environ if env is None else env
    mode = env.get("LGVQ_FAST_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise RuntimeError(f"LGVQ_FAST_BUILD_CUDA must be one of {BUILD_MODES}, got {mode!r}")
    if mode == "0":
        return False, None, "LGVQ_FAST_BUILD_CUDA=0"
    nvcc = find_nvcc(env)
    if nvcc is None:
        if mode == "1":
            raise RuntimeError(
                "LGVQ_FAST_BUILD_CUDA=1 but nvcc was not found on PATH, in $CUDA_HOME/bin, "
                "$CUDA_PATH/bin or /usr/local/cuda/bin"
            )
        return False, None, "nvcc not found"
    return True, nvcc, f"nvcc at {nvcc}"


class CMakeExtension(Extension):
    def __init__(self, name, nvcc):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, then copies the module where setuptools expects it.

    In editable installs setuptools then copies it into lgvq_fast/ in the source tree.
    """

    def build_extension(self, ext):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building lgvq_fast._C needs cmake (pip install cmake) or LGVQ_FAST_BUILD_CUDA=0")
        ninja = shutil.which("ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-" + generator.replace(" ", "-").lower())
        out_dir = os.path.join(build_dir, "out")
        os.makedirs(build_dir, exist_ok=True)
        configure = [
            cmake,
            "-S", ROOT,
            "-B", build_dir,
            "-G", generator,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        if ninja:
            configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        jobs = str(max(1, os.cpu_count() or 1))
        print("lgvq_fast: building the CUDA extension:", " ".join(configure), flush=True)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", build_dir, "--parallel", jobs], check=True)
        built = glob.glob(os.path.join(out_dir, "_C*.so")) + glob.glob(os.path.join(out_dir, "_C*.pyd"))
        if len(built) != 1:
            raise RuntimeError(f"expected one built module _C* in {out_dir}, found {built}")
        dest = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built[0], dest)


def extension_modules():
    build, nvcc, reason = cuda_build_decision()
    if not build:
        print(f"lgvq_fast: not building the CUDA extension lgvq_fast._C ({reason})", flush=True)
        return []
    return [CMakeExtension("lgvq_fast._C", nvcc)]


if __name__ == "__main__":
    setup(
        packages=PACKAGES,
        package_dir={"lgvq_fast.kernels": "kernels"},
        ext_modules=extension_modules(),
        cmdclass={"build_ext": CMakeBuild},
    )
