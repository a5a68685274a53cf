"""Checkpoints and resume (lgvq_fast/training/checkpoint.py): bit-identical resume, moved and unreadable
checkpoints, optimizer-state layout, config changes."""
import os

import pytest
import torch
from _tiny_run import TINY
from _training import (
    rows,
    run_tiny,
)

from lgvq_fast import train as train_mod
from lgvq_fast.errors import CheckpointWriteError, ConfigError
from lgvq_fast.training.checkpoint import CheckpointIO, load_optimizer_state


def test_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_tiny(full, "--steps", "6", "--ckpt-every", "3", "--seed", "3")
    run_tiny(part, "--steps", "3", "--seed", "3")
    summary = run_tiny(part, "--steps", "6", "--seed", "3", "--resume", "auto")
    assert summary["step"] == 6
    a = CheckpointIO.load(CheckpointIO(str(full)).latest())
    b = CheckpointIO.load(CheckpointIO(str(part)).latest())
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])
    for part_name in ("model", "discriminator"):
        for k, v in a[part_name].items():
            assert torch.equal(v, b[part_name][k]), f"{part_name}.{k} differs after resume"
    losses = lambda out: {r["step"]: r["total"] for r in rows(out) if "total" in r}  # noqa: E731
    la, lb = losses(full), losses(part)
    assert all(la[s] == lb[s] for s in range(1, 7)), (la, lb)


def test_resume_with_another_global_batch_keeps_the_epoch_position(tmp_path, capsys):
    # 40 training images at batch 4: 10 batches per epoch; stop after 9 (36 images of epoch 0 seen).
    run_tiny(tmp_path, "--steps", "9", "--seed", "1")
    capsys.readouterr()
    # batch 12 has 3 batches per epoch: the 36 images seen leave no full batch of epoch 0, so epoch 1 starts.
    summary = run_tiny(tmp_path, "--steps", "11", "--seed", "1", "--resume", "auto", "--batch-size", "12")
    assert summary["step"] == 11
    assert "data order differs from an uninterrupted run" in capsys.readouterr().out
    state = CheckpointIO.load(CheckpointIO(str(tmp_path)).latest())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    # batch 2 has 20 batches per epoch; (epoch 1, batch 2 at 12 images) = 24 images seen -> batch 12
    summary = run_tiny(tmp_path, "--steps", "12", "--seed", "1", "--resume", "auto", "--batch-size", "2")
    state = CheckpointIO.load(CheckpointIO(str(tmp_path)).latest())
    assert summary["step"] == 12 and (state["epoch"], state["batch_in_epoch"]) == (1, 13)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = CheckpointIO(str(tmp_path))
    good = io.save({"step": 1, "model": {"w": torch.randn(5)}}, 1)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        io.save({"step": 2, "model": {"w": torch.randn(5)}}, 2)
    monkeypatch.undo()
    assert io.all() == [good]
    assert os.listdir(io.dir) == [os.path.basename(good)]
    assert CheckpointIO.load(good)["step"] == 1


def test_resume_keeps_this_runs_optimizer_settings():
    """load_state_dict would restore the checkpoint's lr / capturable / fused; the run's own settings stay."""

    params = [torch.nn.Parameter(torch.randn(3))]
    old = torch.optim.Adam(params, lr=1e-3)
    params[0].grad = torch.randn(3)
    old.step()
    new = torch.optim.Adam(params, lr=5e-4, capturable=True)
    load_optimizer_state(new, old.state_dict())
    group = new.param_groups[0]
    assert group["lr"] == 5e-4 and group["capturable"] is True
    st = new.state[params[0]]
    assert st["step"].dtype == torch.float32 and float(st["step"]) == 1.0
    assert torch.equal(st["exp_avg"], old.state[params[0]]["exp_avg"])


@pytest.mark.parametrize("saved_format", [torch.channels_last, torch.contiguous_format])
def test_resume_lays_the_moments_out_as_their_parameters(saved_format):
    """A run resumed with another train.channels_last: the checkpoint's Adam moments take the parameter's memory
    format (the fused Adam refuses mixed layouts; PyTorch runs it on CPU tensors too) and keep their values."""

    other = torch.contiguous_format if saved_format == torch.channels_last else torch.channels_last
    old_p = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=saved_format))
    old = torch.optim.Adam([old_p], lr=1e-3, fused=True)
    old_p.grad = torch.randn(4, 3, 3, 3).contiguous(memory_format=saved_format)
    old.step()
    saved = old.state_dict()
    assert saved["state"][0]["exp_avg"].is_contiguous(memory_format=saved_format)
    p = torch.nn.Parameter(old_p.detach().contiguous(memory_format=other))
    new = torch.optim.Adam([p], lr=1e-3, fused=True)
    load_optimizer_state(new, saved)
    for k in ("exp_avg", "exp_avg_sq"):
        assert new.state[p][k].stride() == p.stride(), k
        assert torch.equal(new.state[p][k], old.state[old_p][k]), k
    p.grad = torch.randn(4, 3, 3, 3).contiguous(memory_format=other)
    new.step()  # raises on mixed layouts
    assert torch.isfinite(p).all()


def test_fresh_run_in_a_used_folder_moves_the_old_checkpoints_aside(tmp_path, capsys):
    run_tiny(tmp_path, "--steps", "4", "--ckpt-every", "1")
    old = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in old] == ["step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]
    capsys.readouterr()
    summary = run_tiny(tmp_path, "--steps", "2", "--ckpt-every", "1")  # a new run, no --resume
    assert summary["step"] == 2 and "moved them to" in capsys.readouterr().out
    io = CheckpointIO(str(tmp_path))
    assert [os.path.basename(p) for p in io.all()] == ["step_0000001.pt", "step_0000002.pt"]
    moved = tmp_path / "checkpoints" / "earlier_1"
    assert sorted(p.name for p in moved.glob("step_*.pt")) == [os.path.basename(p) for p in old]
    assert (moved / "metrics.jsonl").exists() and max(r.get("step", 0) for r in rows(tmp_path)) == 2
    # keep_last prunes this run's older checkpoints only, and --resume auto continues this run
    summary = run_tiny(tmp_path, "--steps", "6", "--ckpt-every", "1", "--resume", "auto")
    assert summary["step"] == 6
    assert [os.path.basename(p) for p in io.all()] == ["step_0000004.pt", "step_0000005.pt", "step_0000006.pt"]
    assert len(list(moved.glob("step_*.pt"))) == 3
    # resuming from an earlier checkpoint moves the later ones aside instead of overwriting them
    summary = run_tiny(tmp_path, "--steps", "5", "--resume", io.path(4))
    assert summary["step"] == 5
    assert [os.path.basename(p) for p in io.all()] == ["step_0000004.pt", "step_0000005.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "earlier_2").glob("*.pt")) == [
        "step_0000005.pt", "step_0000006.pt"]


def test_unreadable_checkpoints(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
    run_tiny(tmp_path, "--steps", "3", "--ckpt-every", "1")
    io = CheckpointIO(str(tmp_path))
    good = open(io.path(2), "rb").read()
    with open(io.path(3), "wb") as f:  # truncated latest checkpoint
        f.write(good[: len(good) // 3])
    capsys.readouterr()
    summary = run_tiny(tmp_path, "--steps", "4", "--resume", "auto")  # falls back to step 2
    out = capsys.readouterr().out
    assert summary["step"] == 4 and f"cannot read checkpoint {io.path(3)}" in out and "resumed from" in out
    bad = tmp_path / "text.pt"
    bad.write_text("hello")
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path / "r2"), "--resume", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith(f"train.py: error: cannot read checkpoint {bad}"), err


def test_resume_checks_the_config(tmp_path, capsys):

    run_tiny(tmp_path, "--steps", "2")
    path = CheckpointIO(str(tmp_path)).latest()
    with pytest.raises(ConfigError, match=r"cannot resume from .*model.codebook_size: 24 -> 32"):
        run_tiny(tmp_path, "--steps", "3", "--resume", path, "--set", "model.codebook_size=32")
    capsys.readouterr()
    run_tiny(tmp_path, "--steps", "3", "--resume", "auto", "--set", "model.w_gsa=0.5")
    assert "changed settings (model.w_gsa" in capsys.readouterr().out
    # at or past --steps: nothing to train, the checkpoint stays as it was
    latest = CheckpointIO(str(tmp_path)).latest()
    before = open(latest, "rb").read()
    summary = run_tiny(tmp_path, "--steps", "2", "--resume", "auto")
    assert summary == {"step": 3, "nothing_to_train": True, "rank": 0}
    assert open(latest, "rb").read() == before and CheckpointIO(str(tmp_path)).latest() == latest


def test_resume_follows_the_cosine_schedule(tmp_path):
    """The learning rate is a function of the step: a run resumed mid-way under a cosine schedule ends with the same
    weights as the uninterrupted one, and logs the same learning rates."""
    sched = ["--set", "train.lr_schedule=cosine", "--set", "train.lr_warmup=2", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_tiny(full, "--steps", "6", *sched)
    run_tiny(part, "--steps", "6", "--ckpt-every", "3", *sched)
    os.remove(CheckpointIO(str(part)).latest())  # as if killed after step 3's checkpoint
    assert run_tiny(part, "--steps", "6", "--resume", "auto", *sched)["step"] == 6
    a = CheckpointIO.load(CheckpointIO(str(full)).latest())["model"]
    b = CheckpointIO.load(CheckpointIO(str(part)).latest())["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    lrs = lambda out: [(r["step"], r["lr"]) for r in rows(out) if "lr" in r]  # noqa: E731
    assert lrs(full) == lrs(part) and len({lr for _, lr in lrs(full)}) == 5  # warm-up, top, decay


def test_text_encoder_weights_are_recorded_and_compared(tmp_path, capsys, monkeypatch):
    """The frozen text encoder is rebuilt from its name, not saved: its weights' digest is in each checkpoint, and
    resuming or evaluating against other weights under the same name says so."""
    from lgvq_fast.eval import load_checkpoint_model
    from lgvq_fast.models import TextEncoder
    from lgvq_fast.training.checkpoint import state_sha256

    run_tiny(tmp_path, "--steps", "2")
    path = CheckpointIO(str(tmp_path)).latest()
    state = CheckpointIO.load(path)
    assert state["text_encoder_sha256"] == state_sha256(TextEncoder.build("tiny-random", max_len=12).state_dict())
    capsys.readouterr()
    load_checkpoint_model(path, "cpu")
    run_tiny(tmp_path, "--steps", "3", "--resume", "auto")
    out = capsys.readouterr()
    assert "other text-encoder weights" not in out.out + out.err

    real = TextEncoder.build.__func__

    def nudged(cls, *args, **kwargs):
        enc = real(cls, *args, **kwargs)
        with torch.no_grad():
            next(iter(enc.parameters())).view(-1)[0] += 1e-3
        return enc

    monkeypatch.setattr(TextEncoder, "build", classmethod(nudged))
    load_checkpoint_model(CheckpointIO(str(tmp_path)).latest(), "cpu")
    assert "was trained with other text-encoder weights" in capsys.readouterr().err
    run_tiny(tmp_path, "--steps", "4", "--resume", "auto")
    assert "was trained with other text-encoder weights" in capsys.readouterr().out
