"""The downstream trainer and sampler end to end on a tiny tokenizer: both tasks train and evaluate, resume equals an
uninterrupted run, checkpoints and errors as the tokenizer trainer's."""
import json
import os
import subprocess
import sys

import pytest
from _training import REPO, env, run_tiny

from lgvq_fast.training.checkpoint import CheckpointIO, state_sha256

TINY_DS = ["--no-progress", "--device", "cpu", "--batch-size", "4", "--ckpt-every", "0",
           "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
           "--set", "data.train_size=32", "--set", "data.val_size=8", "--set", "train.eval_size=4",
           "--set", "train.eval_batch=4", "--set", "train.log_every=1", "--set", "train.lr_warmup=2"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    run_tiny(out, "--steps", "2")
    return CheckpointIO(str(out)).latest()


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    from lgvq_fast.downstream.metrics import save_probe, train_probe

    path = str(tmp_path_factory.mktemp("probe") / "probe.pt")
    save_probe(train_probe(resolution=16, steps=3, batch_size=4, seed=0, device="cpu", progress=False), path)
    return path


def _run(tokenizer, out, task, *extra, cache=None):
    from lgvq_fast.downstream import train as ds_train

    return ds_train.main(["--tokenizer", tokenizer, "--task", task, "--out", str(out),
                          "--cache-dir", str(cache or os.path.join(os.path.dirname(str(out)), "codes")), *TINY_DS,
                          *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_caption_task_trains_evaluates_and_writes_its_run_folder(tokenizer, tmp_path):
    summary = _run(tokenizer, tmp_path / "cap", "caption", "--steps", "3")
    ev = summary["eval"]
    assert summary["step"] == 3
    for key in ("val_nll", "parsed", "object", "exact", "bleu4"):
        assert key in ev and ev[key] == ev[key], key
    assert 0 <= ev["object"] <= 1 and ev["val_nll"] > 0
    rows = _rows(tmp_path / "cap")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert rows[-1]["summary"]["step"] == 3
    assert os.path.isfile(tmp_path / "cap" / "samples" / "step_000003.png")
    assert CheckpointIO(str(tmp_path / "cap")).latest().endswith("step_0000003.pt")
    config = json.load(open(tmp_path / "cap" / "config.json"))
    assert config["train"]["task"] == "caption" and config["model"]["image_vocab_size"] == 24


def test_t2i_task_scores_generated_images_with_the_probe(tokenizer, probe_file, tmp_path):
    summary = _run(tokenizer, tmp_path / "t2i", "t2i", "--steps", "2", "--probe", probe_file)
    ev = summary["eval"]
    for key in ("val_nll", "object", "count", "probe_real_object"):
        assert key in ev, key
    assert 0 <= ev["object"] <= 1
    assert os.path.isfile(tmp_path / "t2i" / "samples" / "step_000002.png")


def test_resume_equals_an_uninterrupted_run(tokenizer, tmp_path):
    straight = _run(tokenizer, tmp_path / "a", "caption", "--steps", "6", "--set", "model.dropout=0.1")
    _run(tokenizer, tmp_path / "b", "caption", "--steps", "3", "--set", "model.dropout=0.1",
         "--set", "train.ckpt_every=3")
    resumed = _run(tokenizer, tmp_path / "b", "caption", "--steps", "6", "--set", "model.dropout=0.1",
                   "--resume", "auto")
    a = CheckpointIO.load(CheckpointIO(str(tmp_path / "a")).latest())
    b = CheckpointIO.load(CheckpointIO(str(tmp_path / "b")).latest())
    assert state_sha256(a["model"]) == state_sha256(b["model"])
    assert straight["eval"]["val_nll"] == resumed["eval"]["val_nll"]
    losses = lambda out: [(r["step"], r["loss"]) for r in _rows(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_the_code_cache_is_extracted_once(tokenizer, tmp_path):
    cache = tmp_path / "codes"
    _run(tokenizer, tmp_path / "one", "caption", "--steps", "1", cache=cache)
    before = sorted(os.listdir(cache))
    stamps = {p: os.path.getmtime(os.path.join(cache, p)) for p in before}
    _run(tokenizer, tmp_path / "two", "caption", "--steps", "1", cache=cache)
    assert sorted(os.listdir(cache)) == before
    assert {p: os.path.getmtime(os.path.join(cache, p)) for p in before} == stamps


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tokenizer, tmp_path):
    script = os.path.join(REPO, "lgvq_fast", "downstream", "train.py")
    r = _cli(script, "--task", "caption")
    assert r.returncode == 2 and "--tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli(script, "--tokenizer", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "missing.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli(script, "--tokenizer", tokenizer, "--task", "vqa", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "vqa" in r.stderr, r.stderr


def test_sample_cli_writes_grids_and_names_bad_inputs(tokenizer, probe_file, tmp_path):
    _run(tokenizer, tmp_path / "t2i", "t2i", "--steps", "1", "--probe", probe_file)
    _run(tokenizer, tmp_path / "cap", "caption", "--steps", "1")
    t2i_ckpt = CheckpointIO(str(tmp_path / "t2i")).latest()
    cap_ckpt = CheckpointIO(str(tmp_path / "cap")).latest()
    png = tmp_path / "grid.png"
    r = _cli("-m", "lgvq_fast.downstream.sample", "--ckpt", t2i_ckpt, "--caption", "a large red circle",
             "--caption", "a small blue square above a large green cross", "--n", "2", "--out", str(png))
    assert r.returncode == 0 and os.path.isfile(png), r.stderr
    from PIL import Image

    assert Image.open(png).size[0] > 4 * 16
    r = _cli("-m", "lgvq_fast.downstream.sample", "--ckpt", t2i_ckpt, "--caption", "a large zebra circle")
    assert r.returncode == 2 and "zebra" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("-m", "lgvq_fast.downstream.sample", "--ckpt", cap_ckpt, "--out", str(tmp_path / "cap.png"))
    assert r.returncode == 0 and os.path.isfile(tmp_path / "cap.png"), r.stderr
    # a tokenizer that is not the one the model was trained over
    other = tmp_path / "other_tok"
    run_tiny(other, "--steps", "1", "--seed", "5")
    r = _cli("-m", "lgvq_fast.downstream.sample", "--ckpt", t2i_ckpt, "--tokenizer", CheckpointIO(str(other)).latest(),
             "--caption", "a large red circle")
    assert r.returncode == 2 and "checksum" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # a tokenizer checkpoint passed as the downstream one
    r = _cli("-m", "lgvq_fast.downstream.sample", "--ckpt", tokenizer, "--caption", "a large red circle")
    assert r.returncode == 2 and "not a downstream checkpoint" in r.stderr, r.stderr


def test_resume_over_another_tokenizer_is_refused(tokenizer, tmp_path):
    _run(tokenizer, tmp_path / "r", "caption", "--steps", "1")
    other = tmp_path / "other_tok"
    run_tiny(other, "--steps", "1", "--seed", "3")
    with pytest.raises(ValueError, match="checksum"):
        _run(CheckpointIO(str(other)).latest(), tmp_path / "r", "caption", "--steps", "2", "--resume", "auto")


def test_bad_config_values_are_named():
    from lgvq_fast.downstream.config import build_config, make_parser
    from lgvq_fast.errors import ConfigError

    p = make_parser()
    for argv, culprit in ((["--tokenizer", "x", "--set", "train.top_p=1.5"], "train.top_p"),
                          (["--tokenizer", "x", "--set", "model.image_vocab_size=5"], "image_vocab_size"),
                          (["--tokenizer", "x", "--set", "model.d_model=30", "--set", "model.n_head=4"], "d_model"),
                          (["--tokenizer", "x", "--set", "train.bogus=1"], "bogus"),
                          (["--tokenizer", "x", "--config", "nope"], "nope")):
        with pytest.raises(ConfigError, match=culprit):
            build_config(p.parse_args(argv))
    cfg = build_config(p.parse_args(["--tokenizer", "x", "--task", "t2i", "--set", "model.n_layer=2"]))
    assert cfg.model.n_layer == 2 and cfg.train.task == "t2i" and cfg.out_dir.endswith("downstream-t2i")


def test_tokenizer_eval_reads_reconstructions_with_the_probe(tokenizer, probe_file, tmp_path):
    from lgvq_fast import eval as eval_mod

    result = eval_mod.main(["--ckpt", tokenizer, "--probe", probe_file, "--device", "cpu", "--no-progress"])
    for key in ("recon_count", "recon_colour", "recon_shape", "recon_object", "recon_exact"):
        assert 0.0 <= result[key] <= 1.0, key
    with pytest.raises(ValueError, match="probe"):
        eval_mod.main(["--ckpt", tokenizer, "--probe", tokenizer, "--device", "cpu", "--no-progress"])


def _ddp_worker(rank, world, port, tokenizer, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    summary = _run(tokenizer, out, "caption", "--steps", "3", "--set", "model.dropout=0.1")
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({k: summary[k] for k in ("step", "model_sha256")}, f)


def test_ddp_two_ranks_train_the_same_model_and_extract_once(tokenizer, tmp_path):
    """Two gloo ranks: rank 0 extracts the codes while rank 1 waits, both end with identical weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tokenizer, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3 and r0["model_sha256"] == r1["model_sha256"]
    state = CheckpointIO.load(CheckpointIO(str(tmp_path / "run")).latest())
    assert state["world_size"] == 2 and state_sha256(state["model"]) == r0["model_sha256"]
    assert len(os.listdir(tmp_path / "codes")) == 2  # train and val, no leftover temp folder


def test_t2i_fid_with_a_local_torchscript_feature_extractor(tokenizer, probe_file, tmp_path):
    import torch

    class Features(torch.nn.Module):
        def forward(self, x):
            x = x.float() / 255.0
            pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 12]
            return torch.cat([pooled, pooled.pow(2)], 1)

    path = str(tmp_path / "features.pt")
    torch.jit.script(Features()).save(path)
    summary = _run(tokenizer, tmp_path / "fid", "t2i", "--steps", "1", "--probe", probe_file, "--inception", path)
    assert summary["eval"]["fid"] >= 0
