"""setup.py lists every package of lgvq_fast, so a non-editable install (a wheel) ships them all."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_setup_lists_every_subpackage():
    spec = importlib.util.spec_from_file_location("lgvq_fast_setup", os.path.join(REPO, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() itself runs only under __main__
    found = {"lgvq_fast.kernels"}
    for folder, _, files in os.walk(os.path.join(REPO, "lgvq_fast")):
        if "__init__.py" in files and "__pycache__" not in folder:
            found.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
    assert found == set(setup.PACKAGES), sorted(found ^ set(setup.PACKAGES))
