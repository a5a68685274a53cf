"""The repository's top-level ``kernels/`` folder never shadows an installed distribution named ``kernels``.

transformers imports the PyPI package ``kernels``; our Triton folder of the same name sits at the repository
root, which is on ``sys.path`` whenever a command runs with the root as its working directory (``python -m``,
``python -m pytest``) or a user puts it on PYTHONPATH. Each test here writes a throwaway ``kernels``
distribution (a package with a marker attribute and its ``.dist-info``) into a temporary site folder, puts it
on PYTHONPATH *after* the root, runs a documented command in a subprocess started in the root, and checks in
that process (through a ``sitecustomize`` probe) that ``import kernels`` gave the throwaway package.

The throwaway package forwards to the real ``kernels`` where one is installed (and copies its version), so
transformers, which imports names from it, runs as it would with the real one.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from _tiny_run import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "lgvq-fast-test-throwaway-kernels"

THROWAWAY_INIT = '''
"""A throwaway ``kernels`` for lgvq_fast's tests: marks itself, then runs the installed one's code, if any."""
import importlib.machinery
import os
import sys

THROWAWAY_MARKER = {marker!r}
_skip = {{os.path.realpath(p) for p in {skip!r}}}
_real = importlib.machinery.PathFinder.find_spec(
    "kernels", [p for p in sys.path if os.path.realpath(p or ".") not in _skip])
if _real is not None and _real.origin and _real.origin.endswith("__init__.py"):
    __path__.extend(_real.submodule_search_locations)
    with open(_real.origin) as _f:
        exec(compile(_f.read(), _real.origin, "exec"), globals())
    __file__ = {own!r}
'''

PROBE = '''
"""Records, at exit, which ``kernels`` this process imported (or would import) and whether it was the program
that imported it."""
import atexit
import json
import os
import sys


def _report():
    imported_by_program = "kernels" in sys.modules
    try:
        import kernels

        found = {{"file": getattr(kernels, "__file__", None), "marker": getattr(kernels, "THROWAWAY_MARKER", None)}}
    except Exception as exc:
        found = {{"error": repr(exc)}}
    found["imported_by_program"] = imported_by_program
    found["argv"] = sys.argv
    with open(os.path.join({probe_dir!r}, f"{{os.getpid()}}.json"), "w") as f:
        json.dump(found, f)


atexit.register(_report)
'''


@pytest.fixture
def throwaway(tmp_path):
    """(environment, probe folder): PYTHONPATH = repository root, then a site folder holding a throwaway
    ``kernels`` distribution and the probe."""
    site = tmp_path / "site"
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.1"
    (pkg / "__init__.py").write_text(THROWAWAY_INIT.format(
        marker=MARKER, skip=[str(site), ROOT], own=str(pkg / "__init__.py")))
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (site / "sitecustomize.py").write_text(PROBE.format(probe_dir=str(probe_dir)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(site)]), TRITON_INTERPRET="1")
    return env, probe_dir


def _run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _reports(probe_dir):
    reports = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("*.json"))]
    assert reports, "the probe recorded no process (sitecustomize was not imported)"
    for r in reports:
        assert r.get("marker") == MARKER, f"import kernels in {r['argv']} gave {r}"
        assert r["file"].startswith(str(probe_dir.parent / "site")), r
    return reports


def test_train_cli_runs_from_the_root_with_kernels_installed(throwaway, tmp_path):
    pytest.importorskip("transformers")
    env, probe_dir = throwaway
    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 "lgvq_fast/train.py", *TINY, "--steps", "2", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((out / "checkpoints").glob("step_*.pt"))
    reports = _reports(probe_dir)
    # the worker built the tiny BERT through transformers, which imports kernels itself when one is installed
    if importlib.util.find_spec("kernels") is not None:
        assert any(r["imported_by_program"] and "lgvq_fast/train.py" in " ".join(r["argv"]) for r in reports), reports


def test_eval_argument_check_runs_from_the_root(throwaway, tmp_path):
    env, probe_dir = throwaway
    proc = _run([sys.executable, "-m", "lgvq_fast.eval", "--ckpt", str(tmp_path / "missing.pt")], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "missing.pt" in proc.stderr and "Traceback" not in proc.stderr
    _reports(probe_dir)


def test_bench_script_cpu_path_runs_from_the_root(throwaway):
    env, probe_dir = throwaway
    proc = _run([sys.executable, "bench/ema.py", "--shape", "300x40x12"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "index_add" in proc.stdout or "reference" in proc.stdout, proc.stdout
    _reports(probe_dir)


def test_transformers_after_lgvq_fast_gets_the_installed_kernels(throwaway):
    pytest.importorskip("transformers")
    env, probe_dir = throwaway
    code = textwrap.dedent("""
        import lgvq_fast
        import lgvq_fast.kernels.ema
        import transformers
        from lgvq_fast.models.text import TextEncoder
        te = TextEncoder.build("tiny-random")
        import kernels
        print("KERNELS", kernels.__file__, lgvq_fast.kernels.ema.__file__)
    """)
    proc = _run([sys.executable, "-c", code], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("KERNELS")][0]
    _, kernels_file, ours = line.split()
    assert "site" in kernels_file and ours == os.path.join(ROOT, "kernels", "ema.py")
    _reports(probe_dir)


def test_without_an_installed_kernels_the_top_level_name_is_missing(tmp_path):
    """The repository folder is never the top-level ``kernels``: with nothing else of that name on the path,
    importing it fails as for any missing module (so availability checks see no package)."""
    code = textwrap.dedent("""
        import importlib.machinery, sys
        sys.path[:] = [p for p in sys.path if importlib.machinery.PathFinder.find_spec("kernels", [p]) is None]
        sys.path.insert(0, %r)
        try:
            import kernels
        except ModuleNotFoundError as exc:
            print("MISSING", exc.name)
        else:
            print("FOUND", kernels.__file__)
    """ % ROOT)
    proc = _run([sys.executable, "-c", code], dict(os.environ))
    assert proc.stdout.strip() == "MISSING kernels", proc.stdout + proc.stderr
