"""Faults injected into real runs: a second run in the folder, a killed launcher, a stalled rank, a full disk,
flipped bytes, kill -9; each must end in one line with its exit status and lose nothing."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from _tiny_run import TINY
from _training import (
    REPO,
    TRAIN,
    env,
    gone,
    logged_steps,
    popen,
    rewrite_checkpoint,
    rows,
    wait_for,
)

from lgvq_fast import train as train_mod
from lgvq_fast.errors import Diverged
from lgvq_fast.training.checkpoint import CheckpointIO


def test_second_run_in_the_same_folder_stops_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = popen([sys.executable, TRAIN, *TINY, "--out", str(out), "--steps", "100000", "--ckpt-every", "2"])
    try:
        wait_for(lambda: (out / "checkpoints" / "step_0000002.pt").exists(), [first], what="the first checkpoint")
        second = subprocess.run([sys.executable, TRAIN, *TINY, "--out", str(out), "--steps", "4", "--seed", "1"],
                                cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
        assert second.returncode == 4, second.stdout + second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "in use by another run" in err[0] and f"pid {first.pid}" in err[0], err
        assert not (out / "checkpoints" / "earlier_1").exists()
        first.send_signal(signal.SIGTERM)
        log, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, log
    steps = [CheckpointIO.load(p)["step"] for p in CheckpointIO(str(out)).all()]
    assert steps and steps[-1] >= 2 and all(r.get("step", 0) <= steps[-1] for r in rows(out) if "l1" in r)


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "earlier"}))
    summary = train_mod.main(TINY + ["--out", str(out), "--steps", "1"])
    assert summary["step"] == 1
    assert f"took over the lock of {out} left by pid {int(dead.stdout)}" in capsys.readouterr().out
    # released at the end: the file is emptied and the next run takes it without a warning
    assert (out / ".lock").read_text() == ""
    train_mod.main(TINY + ["--out", str(out), "--steps", "2", "--resume", "auto"])
    assert "took over" not in capsys.readouterr().out


def test_torchrun_worker_stops_when_its_launcher_is_killed(tmp_path):
    out = tmp_path / "run"
    launcher = popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN,
                       *TINY, "--out", str(out), "--steps", "100000", "--ckpt-every", "0"], start_new_session=True)
    try:
        wait_for(logged_steps(out, 3), [launcher], what="the worker's first metrics rows")
        worker = json.loads((out / ".lock").read_text())["pid"]
        assert worker != launcher.pid
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.time() + 90
        while time.time() < deadline and not gone(worker):
            time.sleep(0.2)
        assert gone(worker), "the orphaned worker kept training"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # it stopped as for a signal: a last checkpoint, and the folder free for the user's --resume auto
    latest = CheckpointIO(str(out)).latest()
    assert latest is not None and (out / ".lock").read_text() == ""
    state = CheckpointIO.load(latest)
    assert train_mod.main(TINY + ["--out", str(out), "--steps", str(state["step"] + 1), "--resume", "auto"])[
        "step"] == state["step"] + 1


def test_nonfinite_state_is_never_checkpointed(tmp_path):
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "3"])
    good = CheckpointIO(str(tmp_path)).latest()

    def corrupt_adam(state):
        moments = next(s for s in state["opt_g"]["state"].values() if "exp_avg_sq" in s)
        moments["exp_avg_sq"].view(-1)[0] = -1.0  # sqrt(-1): that weight turns NaN at the next update

    rewrite_checkpoint(good, corrupt_adam)
    with pytest.raises(Diverged, match=r"not finite after step 4 .*latest good one: .*step_0000003\.pt"):
        train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "6", "--ckpt-every", "1", "--resume", "auto"])
    assert CheckpointIO(str(tmp_path)).all() == [good]


def test_flipped_bytes_fail_the_checksum_and_resume_auto_skips_the_file(tmp_path, capsys):
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "4", "--ckpt-every", "2"])
    io = CheckpointIO(str(tmp_path))
    older, latest = io.all()
    with zipfile.ZipFile(latest) as z:
        # the largest tensor's bytes (torch.save stores each storage as <archive>/data/<key>, uncompressed)
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(latest, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        data = info.header_offset + 30 + name_len + extra_len
        f.seek(data + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(data + info.file_size // 2)
        f.write(bytes([byte ^ 0x40]))
    with pytest.raises(ValueError, match="fails its checksum"):
        CheckpointIO.load(latest)
    assert io.latest_good() == older
    capsys.readouterr()
    summary = train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "5", "--resume", "auto"])
    out = capsys.readouterr().out
    assert summary["step"] == 5 and "fails its checksum" in out and f"resumed from {older}" in out


def test_stalled_rank_ends_the_run_within_the_timeout_naming_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        rank_env = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                       LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN, *TINY, "--out", str(out), "--steps", "100000", "--ckpt-every", "2",
             "--device", "cpu", "--set", "train.dist_timeout=6", "--set", "train.find_unused_parameters=true"],
            cwd=REPO, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        wait_for(lambda: (out / "checkpoints" / "step_0000002.pt").exists(), procs, what="the first checkpoint")
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.time()
        log, _ = procs[0].communicate(timeout=120)
        waited = time.time() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 5, log
    line = [ln for ln in log.splitlines() if ln.startswith("train.py: error:")]
    assert len(line) == 1 and "rank 1 silent" in line[0] and "waited more than 6 s" in line[0], log[-3000:]
    assert waited < 60, waited
    assert CheckpointIO(str(out)).latest_good() is not None


def test_disk_full_is_one_line_keeps_the_earlier_checkpoints_and_exits_6(tmp_path, monkeypatch, capsys):
    import lgvq_fast.training.checkpoint as ckpt_mod

    opened = {"n": 0}
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "w" in mode and ".pt.tmp" in str(path):
            opened["n"] += 1
            if opened["n"] >= 2:  # the first checkpoint fits, the second does not
                return FullDisk(f)
        return f

    monkeypatch.setattr(ckpt_mod, "open", fake_open, raising=False)
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path), "--steps", "6", "--ckpt-every", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 6, err
    assert len(err) == 1 and "No space left on device" in err[0] and "needs about" in err[0], err
    assert "step_0000004.pt" in err[0] and str(tmp_path / "checkpoints") in err[0]
    io = CheckpointIO(str(tmp_path))
    assert [os.path.basename(p) for p in io.all()] == ["step_0000002.pt"]
    assert os.listdir(io.dir) == ["step_0000002.pt"]


def test_worker_data_error_is_one_line_once(tmp_path, monkeypatch, capsys):
    from lgvq_fast.data import shapes

    real = shapes.ShapesDataset.get

    def broken(self, i, rng=None):
        if self.split == "train" and i == 13:
            raise ValueError("cannot read image file /data/broken_13.png: truncated")
        return real(self, i, rng)

    monkeypatch.setattr(shapes.ShapesDataset, "get", broken)
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path), "--steps", "20", "--num-workers", "2"])
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert info.value.code == 2
    assert len(err) == 1 and err[0].startswith("train.py: error: cannot read image file /data/broken_13.png"), err
    assert "Traceback" not in captured.err and (captured.out + captured.err).count("broken_13.png") == 1


def test_stale_temp_files_are_removed_at_start_up(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step_0000005.pt.tmp4242").write_bytes(b"\0" * 1000)
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "1"])
    assert not list(ckpts.glob("*.tmp*"))
    assert "step_0000005.pt.tmp4242" in capsys.readouterr().out


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "5", "--ckpt-every", "2"])
    io = CheckpointIO(str(tmp_path))
    for p in io.all():  # killed before it wrote step 4's and the final checkpoint: logged 3-5 and the summary stay
        if CheckpointIO.load(p)["step"] > 2:
            os.remove(p)
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "5", "--resume", "auto"])
    logged = rows(tmp_path)
    steps = [r["step"] for r in logged if "l1" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert [r["summary"]["step"] for r in logged if "summary" in r] == [5]


def test_resume_of_a_finished_run_writes_the_missing_summary_and_pictures(tmp_path, capsys):
    train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "3"])
    # killed after the final checkpoint, before the end-of-run outputs
    logged = [r for r in rows(tmp_path) if "summary" not in r]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    os.remove(tmp_path / "codebook_usage.png")
    os.remove(tmp_path / "samples" / "step_000003.png")
    latest = CheckpointIO(str(tmp_path)).latest()
    before = open(latest, "rb").read()
    summary = train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "3", "--resume", "auto"])
    assert summary["step"] == 3 and summary["val_psnr_end"] == pytest.approx(summary["val_psnr_start"])
    assert (tmp_path / "codebook_usage.png").exists() and (tmp_path / "samples" / "step_000003.png").exists()
    assert [r["summary"]["step"] for r in rows(tmp_path) if "summary" in r] == [3]
    assert open(latest, "rb").read() == before and CheckpointIO(str(tmp_path)).all() == [latest]
    capsys.readouterr()
    again = train_mod.main(TINY + ["--out", str(tmp_path), "--steps", "3", "--resume", "auto"])
    assert again.get("nothing_to_train") and "nothing to train" in capsys.readouterr().out


def test_diverged_run_is_one_line_with_status_3(tmp_path, monkeypatch, capsys):
    from lgvq_fast.models.losses import VQGANLoss

    real = VQGANLoss.generator_loss

    def poisoned(self, x, out, global_step, **kwargs):
        loss, logs = real(self, x, out, global_step, **kwargs)
        if global_step >= 1:
            loss = loss * float("inf")
            logs["total"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", poisoned)
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path), "--steps", "4", "--set", "train.log_every=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 3 and len(err) == 1 and "training diverged" in err[0], err


def test_kill_9_then_resume_repeats_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    steps = 8
    args = [sys.executable, TRAIN, *TINY, "--steps", str(steps), "--seed", "5", "--set", "train.log_every=1"]
    # every run in a subprocess with the same environment (thread count included): same arithmetic
    subprocess.run(args + ["--out", str(full)], cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    proc = popen(args + ["--out", str(part), "--ckpt-every", "2"])
    try:
        wait_for(lambda: (part / "checkpoints" / "step_0000004.pt").exists(), [proc], what="the step-4 checkpoint")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = subprocess.run(args + ["--out", str(part), "--resume", "auto"], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "took over the lock" in resumed.stdout
    sha = lambda out: [r["summary"]["model_sha256"] for r in rows(out) if "summary" in r]  # noqa: E731
    assert sha(part) == sha(full) and len(sha(full)) == 1
    logged = [r["step"] for r in rows(part) if "l1" in r]
    assert logged == list(range(1, steps + 1))
    assert not list((part / "checkpoints").glob("*.tmp*"))
