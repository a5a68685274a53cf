"""Evaluation (python -m lgvq_fast.eval): metrics, retrieval, FID's local-only Inception, the CLI's one-line errors."""
import json
import os

import pytest
import torch
from _tiny_run import TINY
from _training import (
    rewrite_checkpoint,
    run_tiny,
)
from PIL import Image

from lgvq_fast import eval as eval_mod
from lgvq_fast import train as train_mod
from lgvq_fast.models import TextEncoder
from lgvq_fast.training.checkpoint import CheckpointIO, payload_digest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of 2 training steps of the tiny model on the shapes data, trained once for this file."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        train_mod.main(TINY + ["--out", str(out), "--steps", "2"])
    return CheckpointIO(str(out)).latest()


def _variant(ckpt, path, model=None, data=None):
    """A copy of ``ckpt`` with some of its stored model / data settings changed (and a checksum that fits)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["config"]["model"].update(model or {})
    state["config"]["data"].update(data or {})
    state["checksum"] = payload_digest({k: v for k, v in state.items() if k != "checksum"})
    torch.save(state, path)
    return str(path)


def _user_error(argv, capsys):
    """Run the CLI expecting a user error: exit status 2 and one ``eval.py: error:`` line, no traceback."""
    with pytest.raises(SystemExit) as info:
        eval_mod.cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, err
    assert lines and lines[-1].startswith("eval.py: error: "), err
    assert "Traceback" not in err
    return lines[-1]


def _must_not_run(*args, **kwargs):
    raise AssertionError("the bad option must be reported before the checkpoint is loaded / the evaluation runs")


def _celebahq_folder(root, good=("0", "1"), corrupt=("2",), no_caption=()):
    """A CelebA-HQ-style folder (``val.txt``, ``images/``, ``celeba-caption/``) with 20x20 images; ``corrupt``
    images are not image files, ``no_caption`` images have no caption file."""
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "celeba-caption"))
    ids = [*good, *corrupt, *no_caption]
    for k, i in enumerate(ids):
        path = os.path.join(root, "images", f"{i}.png")
        if i in corrupt:
            with open(path, "wb") as f:
                f.write(b"this is not a png")
        else:
            Image.new("RGB", (20, 20), (40 * k, 200 - 40 * k, 90)).save(path)
        if i not in no_caption:
            with open(os.path.join(root, "celeba-caption", f"{i}.txt"), "w") as f:
                f.write("a woman with long black hair and a warm smile\nshe has black hair\n")
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return str(root)


def test_eval_cli_and_metrics(tmp_path):
    from lgvq_fast import eval as eval_mod

    run_tiny(tmp_path, "--steps", "2")
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


def test_eval_writes_valid_json_and_fails_on_nonfinite_metrics(tmp_path, monkeypatch, capsys):
    train_mod.main(TINY + ["--out", str(tmp_path / "run"), "--steps", "1"])
    ckpt = CheckpointIO(str(tmp_path / "run")).latest()
    real = eval_mod.evaluate
    monkeypatch.setattr(eval_mod, "evaluate",
                        lambda *a, **kw: dict(real(*a, **kw), psnr=float("nan"), fid=float("inf")))
    out = tmp_path / "m.json"
    with pytest.raises(SystemExit) as info:
        eval_mod.cli(["--ckpt", ckpt, "--out", str(out), "--max-batches", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert info.value.code == 3 and "psnr" in captured.err and "fid" in captured.err
    result = json.loads(out.read_text())  # strict JSON: no NaN token
    assert result["psnr"] is None and result["fid"] is None and isinstance(result["ssim"], float)
    # a checkpoint holding NaN weights is refused when it is read
    rewrite_checkpoint(ckpt, lambda s: s["model"][next(k for k, v in s["model"].items() if v.is_floating_point())].fill_(
        float("nan")))
    with pytest.raises(SystemExit) as info:
        eval_mod.cli(["--ckpt", ckpt, "--max-batches", "1", "--no-progress"])
    assert info.value.code == 2 and "non-finite" in capsys.readouterr().err


def test_stored_skip_bad_samples_and_max_words_are_used(ckpt, tmp_path, capsys, monkeypatch):
    import lgvq_fast.data as data_mod

    root = _celebahq_folder(tmp_path / "celeba", corrupt=("2",), no_caption=("3",))
    path = _variant(ckpt, tmp_path / "folder.pt", data={"name": "celebahq", "skip_bad_samples": True, "max_words": 4})
    built = []
    real = data_mod.build_dataset

    def spy(*args, **kwargs):
        built.append((kwargs, real(*args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(data_mod, "build_dataset", spy)
    result = eval_mod.cli(["--ckpt", path, "--data-root", root, "--device", "cpu", "--no-progress"])
    (kwargs, ds), = built
    assert kwargs["max_words"] == 4 and kwargs["skip_bad_samples"] is True
    # only the 4-word caption qualifies (the other one has 10 words)
    assert all(caps == ["she has black hair"] for _, caps in ds.entries)
    # image 3 (no caption file) is skipped when the dataset is built, image 2 (not a PNG) while reading
    assert result["images"] == 3 and result["skipped_samples"] == 2
    assert "skipped bad samples: 1 at build time, 1 unreadable image(s) while reading" in capsys.readouterr().err


def test_skip_bad_samples_flag(ckpt, tmp_path, capsys):
    root = _celebahq_folder(tmp_path / "celeba", corrupt=("2",))
    path = _variant(ckpt, tmp_path / "folder.pt", data={"name": "celebahq", "skip_bad_samples": False})
    argv = ["--ckpt", path, "--data-root", root, "--device", "cpu", "--no-progress"]
    msg = _user_error(argv, capsys)
    assert os.path.join(root, "images", "2.png") in msg and "--skip-bad-samples" in msg, msg
    result = eval_mod.cli(argv + ["--skip-bad-samples", "--out", str(tmp_path / "m.json")])
    assert result["images"] == 3 and result["skipped_samples"] == 1
    assert "skipped bad samples: 0 at build time, 1 unreadable image(s)" in capsys.readouterr().err
    assert json.load(open(tmp_path / "m.json"))["skipped_samples"] == 1


def test_unknown_split_is_a_usage_error(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(eval_mod, "load_checkpoint_model", _must_not_run)
    msg = _user_error(["--ckpt", ckpt, "--split", "validation", "--device", "cpu"], capsys)
    assert "argument --split: invalid choice: 'validation'" in msg, msg


def test_inception_that_is_not_torchscript(ckpt, tmp_path, capsys, monkeypatch):
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"not a model")
    monkeypatch.setattr(eval_mod, "load_checkpoint_model", _must_not_run)
    msg = _user_error(["--ckpt", ckpt, "--inception", str(bogus), "--device", "cpu"], capsys)
    assert msg.startswith("eval.py: error: --inception: ") and str(bogus) in msg and "TorchScript" in msg, msg


def test_out_folder_is_made_up_front(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "sub" / "m.json"
    result = eval_mod.cli(["--ckpt", ckpt, "--device", "cpu", "--no-progress", "--max-batches", "1",
                           "--out", str(out)])
    assert json.load(open(out)) == result and not os.path.exists(str(out) + ".tmp")
    # an --out that cannot be written fails before the checkpoint is loaded
    monkeypatch.setattr(eval_mod, "load_checkpoint_model", _must_not_run)
    monkeypatch.setattr(eval_mod, "evaluate", _must_not_run)
    msg = _user_error(["--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a directory" in msg, msg
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = _user_error(["--ckpt", ckpt, "--device", "cpu", "--out", str(blocker / "m.json")], capsys)
    assert str(blocker / "m.json") in msg and "cannot create its folder" in msg, msg


def test_cuda_device_without_cuda(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _user_error(["--ckpt", ckpt, "--device", "cuda", "--no-progress", "--max-batches", "1"], capsys)
    assert "--device cuda: CUDA is not available" in msg, msg
    msg = _user_error(["--ckpt", ckpt, "--device", "gpu0"], capsys)
    assert "--device 'gpu0'" in msg, msg


def test_unreadable_checkpoint_is_named(ckpt, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    with open(ckpt, "rb") as f:
        truncated.write_bytes(f.read(100_000))
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    no_config = tmp_path / "no_config.pt"
    torch.save({"model": {}, "step": 3}, no_config)
    for path in (truncated, text, no_config):
        msg = _user_error(["--ckpt", str(path), "--device", "cpu"], capsys)
        assert msg.startswith(f"eval.py: error: cannot read checkpoint {path}: "), msg


def test_weights_that_do_not_fit_the_model(ckpt, tmp_path, capsys):
    # trained with the tiny random text encoder (width 32), evaluated with MiniLM (width 384)
    msg = _user_error(["--ckpt", ckpt, "--device", "cpu", "--text-encoder", "minilm"], capsys)
    assert f"checkpoint {ckpt}: its weights do not fit the model" in msg, msg
    assert "'minilm'" in msg and "'tiny-random'" in msg and "has shape" in msg, msg
    # any size mismatch between the stored config and the stored weights
    path = _variant(ckpt, tmp_path / "codebook.pt", model={"codebook_size": 30})
    msg = _user_error(["--ckpt", path, "--device", "cpu"], capsys)
    assert f"checkpoint {path}: its weights do not fit" in msg and "quantizer.embed has shape [24, 8]" in msg, msg


def test_eval_never_uses_coco_training_images_silently():
    """A COCO run without validation annotations: eval takes its held-out images, or stops naming both ways out."""
    from types import SimpleNamespace

    from lgvq_fast.errors import EvalError
    from lgvq_fast.eval import _eval_annotations

    d = {"name": "coco", "annotations": "/data/train.json", "val_annotations": None, "val_holdout": 0.0}
    args = SimpleNamespace(annotations=None, split="val")
    with pytest.raises(EvalError, match=r"train\.json holds its training images; pass --annotations FILE"):
        _eval_annotations(args, d)
    assert _eval_annotations(SimpleNamespace(annotations=None, split="train"), d) == ("/data/train.json", 0.0)
    assert _eval_annotations(SimpleNamespace(annotations="/v.json", split="val"), d) == ("/v.json", 0.0)
    assert _eval_annotations(args, dict(d, val_holdout=0.05)) == ("/data/train.json", 0.05)
    assert _eval_annotations(args, dict(d, val_annotations="/data/val.json")) == ("/data/val.json", 0.0)
    shapes = {"name": "shapes", "annotations": None, "val_annotations": None}
    assert _eval_annotations(args, shapes) == (None, 0.0)
