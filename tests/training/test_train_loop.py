"""The training loop (lgvq_fast/train.py) end to end on a tiny model: outputs, signals, several processes,
divergence, data errors, one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _tiny_run import TINY
from _training import (
    REPO,
    rows,
    run_tiny,
)

from lgvq_fast import eval as eval_mod
from lgvq_fast import train as train_mod
from lgvq_fast.training.checkpoint import (
    CheckpointIO,
)


def test_tiny_run_writes_checkpoint_grid_metrics(tmp_path):
    summary = run_tiny(tmp_path, "--steps", "4", "--ckpt-every", "2", "--sample-every", "2")
    assert summary["step"] == 4
    ckpts = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in ckpts] == ["step_0000002.pt", "step_0000004.pt"]
    state = CheckpointIO.load(ckpts[-1])
    assert state["step"] == 4 and state["config"]["model"]["codebook_size"] == 24
    assert {"model", "discriminator", "opt_g", "opt_d", "rng", "epoch", "batch_in_epoch"} <= set(state)
    assert os.path.isfile(tmp_path / "samples" / "step_000002.png")
    assert os.path.isfile(tmp_path / "samples" / "step_000004.png")
    assert os.path.isfile(tmp_path / "codebook_usage.png")
    logged = [r for r in rows(tmp_path) if "step" in r and "l1" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(k in logged[-1] for k in ("psnr", "codebook_usage", "lr", "images_per_s", "gsa", "mtp", "ras"))
    # disc_start = 2: the discriminator trains from the third step on, never before
    assert "d_loss" not in logged[1] and "d_loss" in logged[2]
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_sigterm_saves_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.join(REPO, "lgvq_fast", "train.py"), *TINY, "--out", str(out),
           "--steps", "100000", "--ckpt-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # a stop by signal is not a success: 128 + SIGTERM, after the checkpoint
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "checkpoint (signal)" in log and "stopped by SIGTERM" in log
    state = CheckpointIO.load(CheckpointIO(str(out)).latest())
    stopped = state["step"]
    assert 3 <= stopped < 100000
    summary = run_tiny(out, "--steps", str(stopped + 2), "--resume", "auto")
    assert summary["step"] == stopped + 2
    steps_after = [r["step"] for r in rows(out) if "l1" in r and r["step"] > stopped]
    assert steps_after == [stopped + 1, stopped + 2]


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train_mod.main(TINY + ["--out", out, "--steps", "3", "--device", "cpu",
                                     "--set", "model.ema_update=true", "--set", "train.find_unused_parameters=true"])
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def test_ddp_two_ranks_identical_codebooks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert r0["step"] == r1["step"] == 3
    assert r0["model_sha256"] == r1["model_sha256"]
    state = CheckpointIO.load(CheckpointIO(str(tmp_path / "run")).latest())
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
    for argv, culprit in [(["--config", "imagenet"], "unknown --config 'imagenet'"),
                          (["--config", "cub", "--data-root", str(tmp_path / "no_cub"), "--text-encoder", "tiny-random",
                            "--no-perceptual"], str(tmp_path / "no_cub")),
                          (TINY + ["--out", str(tmp_path / "r"), "--resume", str(tmp_path / "nope.pt")], "nope.pt")]:
        with pytest.raises(SystemExit) as info:
            train_mod.cli(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("train.py: error: ") and culprit in err[-1], err
        assert not any("Traceback" in line for line in err)

    with pytest.raises(SystemExit) as info:
        eval_mod.cli(["--ckpt", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("eval.py: error: ") and "missing.pt" in err[-1]
    monkeypatch.setenv("LGVQ_TRACEBACK", "1")
    with pytest.raises(Exception, match="unknown --config"):
        train_mod.cli(["--config", "imagenet"])


def test_text_losses_at_weight_zero_match_no_text_losses(tmp_path):
    """The ablation's control: with the text losses weighted 0 the tokenizer and the discriminator train
    bit-identically to --no-text-losses (the heads' init, their dropout and every later random draw leave the
    rest untouched); with a non-zero weight they do not."""
    zero = ["--set", "model.w_gsa=0", "--set", "model.w_mtp=0", "--set", "model.w_ras=0"]
    common = ["--steps", "5", "--ckpt-every", "0", "--sample-every", "0", "--seed", "3"]
    run_tiny(tmp_path / "off", *common, "--no-text-losses")
    run_tiny(tmp_path / "zero", *common, *zero)
    run_tiny(tmp_path / "on", *common, "--set", "model.w_mtp=1", "--set", "model.w_gsa=1", "--set", "model.w_ras=1")
    states = {k: CheckpointIO.load(CheckpointIO(str(tmp_path / k)).latest()) for k in ("off", "zero", "on")}
    off = states["off"]["model"]
    assert off and not any(k.startswith(("sam.", "ram.")) for k in off)
    for name in ("zero", "on"):
        assert {k for k in states[name]["model"] if not k.startswith(("sam.", "ram."))} == set(off)
    for k in off:
        assert torch.equal(states["zero"]["model"][k], off[k]), k
    for k, v in states["off"]["discriminator"].items():
        assert torch.equal(states["zero"]["discriminator"][k], v), k
    assert any(not torch.equal(states["on"]["model"][k], off[k]) for k in off if k.startswith("encoder."))


def test_nonfinite_loss_stops_without_writing_a_checkpoint(tmp_path, monkeypatch):
    from lgvq_fast.models.losses import VQGANLoss

    real = VQGANLoss.generator_loss

    def poisoned(self, x, out, global_step, **kwargs):
        loss, logs = real(self, x, out, global_step, **kwargs)
        if global_step >= 3:  # the fourth step
            loss = loss * float("nan")
            logs["total"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"between step \d+ and step 4.*step_0000002\.pt"):
        run_tiny(tmp_path, "--steps", "8", "--ckpt-every", "2", "--set", "train.log_every=4")
    ckpts = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in ckpts] == ["step_0000002.pt"]
    state = CheckpointIO.load(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.gpu
def test_tiny_run_on_gpu_with_bf16_autocast(tmp_path):
    """The trainer on CUDA: bf16 autocast, the fused ops on GPU tensors, channels_last, checkpoint and resume."""
    out = tmp_path / "gpu"
    summary = run_tiny(out, "--steps", "4", "--device", "cuda", "--set", "train.channels_last=true")
    assert summary["step"] == 4 and summary["val_psnr_end"] == summary["val_psnr_end"]  # not NaN
    logged = [r for r in rows(out) if "total" in r]
    assert logged and all(torch.isfinite(torch.tensor(r["total"])) for r in logged)
    summary = run_tiny(out, "--steps", "6", "--device", "cuda", "--resume", "auto")
    state = CheckpointIO.load(CheckpointIO(str(out)).latest())
    assert summary["step"] == 6 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_data_error_mid_run_saves_a_checkpoint_first(tmp_path, monkeypatch, capsys):
    from lgvq_fast.data import shapes

    real = shapes.ShapesDataset.get
    calls = {"n": 0}

    def flaky(self, i, rng=None):
        if self.split == "train":
            calls["n"] += 1
            if calls["n"] > 4 * 3:  # the 4th batch of 4 fails
                raise ValueError("cannot read image file /data/broken.png: truncated")
        return real(self, i, rng)

    monkeypatch.setattr(shapes.ShapesDataset, "get", flaky)
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path), "--steps", "10", "--ckpt-every", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "/data/broken.png" in err[-1] and "--resume auto" in err[-1], err
    state = CheckpointIO.load(CheckpointIO(str(tmp_path)).latest())
    assert state["step"] == 3
    monkeypatch.setattr(shapes.ShapesDataset, "get", real)
    assert run_tiny(tmp_path, "--steps", "5", "--resume", "auto")["step"] == 5
