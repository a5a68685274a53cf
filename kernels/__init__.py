"""Triton kernels of lgvq_fast, installed as ``lgvq_fast.kernels`` (setup.py maps this folder there).

This folder sits at the repository root under a name that PyPI also uses: the ``kernels`` distribution, which
transformers imports. Whenever the root is on ``sys.path`` -- the working directory of ``python -m ...`` or
``python -m pytest`` run there, a user's PYTHONPATH -- ``import kernels`` reaches this file first. So this file
refuses to be the top-level ``kernels``: imported under that name, it finds the module of that name that the
rest of ``sys.path`` holds, runs it and puts it in ``sys.modules`` in its own place, which is what the import
statement then returns (importlib reads ``sys.modules`` back after running a module). With none installed the
import fails as for any missing module.

Why this and not another mechanism: the folder name and its install as ``lgvq_fast.kernels`` are fixed; a
folder without ``__init__.py`` would never shadow a regular package (PEP 420), but setuptools' editable finder
cannot import ``lgvq_fast.kernels`` from such a folder; and a guard only in our scripts would not cover
``python -m`` from the root or a user's PYTHONPATH.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _holds_this_folder(entry):
        init = os.path.join(entry or os.getcwd(), "kernels", "__init__.py")
        try:
            return os.path.samefile(init, __file__)
        except OSError:
            return False

    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if not _holds_this_folder(entry)]
    )
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is lgvq_fast.kernels, "
            "not the top-level kernels package)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
