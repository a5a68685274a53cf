"""Paper presets train the paper's setup (CLIP ViT-B/32's text tower, LPIPS) or stop before anything is built,
naming what is missing, how to make it and the opt-out; an opt-out is recorded in config.json and the start-up
line. Tiny local stand-ins play CLIP and LPIPS."""
import json

import pytest
import torch
from _stand_ins import make_tiny_clip, make_tiny_lpips
from _tiny_run import TINY

from lgvq_fast import train as train_mod
from lgvq_fast.errors import ConfigError
from lgvq_fast.training.config import PRESETS, build_config, parse_args

PAPER = [name for name, p in PRESETS.items() if p.paper]
# the tiny model on the shapes data, whatever dataset the preset names
SHAPES = TINY + ["--set", "data.name=shapes", "--set", "data.num_workers=0"]


def test_every_paper_dataset_has_a_paper_preset():
    assert {PRESETS[n].data for n in PAPER} == {"cub", "celebahq", "coco", "textcaps"}
    assert not PRESETS["tiny-cpu"].paper


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_without_clip_or_lpips_stops_naming_both_ways_out(name, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_models", lambda *a, **k: pytest.fail("built something"))
    data = ["--data-root", str(tmp_path), "--image-dir", str(tmp_path), "--annotations", str(tmp_path / "a.json")]
    if PRESETS[name].data == "coco":
        data += ["--set", "data.val_holdout=0.1"]
    with pytest.raises(ConfigError) as info:
        train_mod.main(["--config", name, *data, "--out", str(tmp_path / "run")])
    msg = str(info.value)
    assert "\n" not in msg and f"preset {name}" in msg
    for needle in ("CLIP ViT-B/32", "--text-encoder DIR", "save_pretrained", "--text-encoder minilm",
                   "LPIPS", "--lpips FILE", "lgvq_fast/models/perceptual.py", "--no-perceptual"):
        assert needle in msg, needle
    assert not (tmp_path / "run").exists()
    # only LPIPS missing: only LPIPS named
    with pytest.raises(ConfigError) as info:
        build_config(parse_args(["--config", name, *data, "--text-encoder", "minilm"]))
    assert "--lpips FILE" in str(info.value) and "--text-encoder DIR" not in str(info.value)


def test_paper_preset_trains_with_clip_and_lpips(tmp_path, capsys):
    clip, lpips = make_tiny_clip(tmp_path / "clip"), make_tiny_lpips(tmp_path / "lpips.safetensors")
    out = tmp_path / "run"
    summary = train_mod.main(["--config", "cub", *SHAPES, "--text-encoder", str(clip), "--lpips", str(lpips),
                              "--steps", "2", "--out", str(out)])
    assert summary["step"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert "paper_deviations" not in saved and saved["model"]["lpips_path"] == str(lpips)
    assert "not the paper's setup" not in capsys.readouterr().out


def test_opt_out_is_recorded_in_config_and_start_up_line(tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.main(["--config", "celebahq", *SHAPES, "--text-encoder", "tiny-random", "--no-perceptual",
                    "--steps", "1", "--out", str(out)])
    saved = json.loads((out / "config.json").read_text())
    assert saved["paper_deviations"] == ["text encoder tiny-random instead of CLIP ViT-B/32",
                                         "no LPIPS perceptual loss"]
    assert saved["model"]["perceptual_weight"] == 0.0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("config celebahq"))
    assert "not the paper's setup: text encoder tiny-random instead of CLIP ViT-B/32; no LPIPS" in line


def test_missing_files_are_named_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"--lpips .*nope\.safetensors: no such file"):
        build_config(parse_args(["--config", "cub", *SHAPES, "--text-encoder", "minilm",
                                 "--lpips", str(tmp_path / "nope.safetensors")]))
    with pytest.raises(ConfigError, match=r"--text-encoder .*no_clip: not minilm, tiny-random or a local model"):
        build_config(parse_args(["--config", "cub", *SHAPES, "--text-encoder", str(tmp_path / "no_clip"),
                                 "--no-perceptual"]))


@pytest.mark.parametrize("init", ["official", "torch"])
def test_mtp_decoder_initialisation(init):
    """official: q/k/v/out and FFN weights ~ N(0, d^-1/2); torch: PyTorch's Linear default (std (3 d)^-1/2)."""
    from lgvq_fast.models.sam import MTPDecoder

    d = 96
    dec = MTPDecoder(d, layers=2, heads=1, ffn_hidden=d, init=init)
    weights = [w for layer in dec.layers for w in (layer.self_attn.w_q.weight, layer.self_attn.w_k.weight,
                                                    layer.self_attn.w_v.weight, layer.self_attn.w_out.weight,
                                                    layer.cross_attn.w_q.weight, layer.ffn[0].weight,
                                                    layer.ffn[3].weight)]
    std = torch.cat([w.detach().flatten() for w in weights]).double().std().item()
    want = d ** -0.5 if init == "official" else (3 * d) ** -0.5
    assert abs(std / want - 1) < 0.03, (std, want)
    with pytest.raises(ValueError, match="mtp init"):
        MTPDecoder(d, init="xavier")
