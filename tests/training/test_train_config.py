"""Training configuration (lgvq_fast/training/config.py): presets, the flag table, --set parsing, each section's validation, the "auto" settings."""
import json

import pytest
import torch
from _tiny_run import TINY
from _training import (
    run_tiny,
)

from lgvq_fast import train as train_mod
from lgvq_fast.errors import ConfigError
from lgvq_fast.training.config import (
    FLAGS,
    PRESETS,
    apply_override,
    build_config,
    make_parser,
    parse_args,
    preset_config,
    resolve_auto,
)
from lgvq_fast.training.step import build_models


def test_set_override_parsing():

    cfg = build_config(parse_args(["--set", "model.ch_mult=(1,2,4)", "--set", "model.ema_update=1",
                                             "--set", "train.lr=none", "--no-text-losses", "--steps", "7"]))
    assert cfg.model.ch_mult == (1, 2, 4) and cfg.model.ema_update is True and cfg.train.lr is None
    assert cfg.model.use_text_losses is False and cfg.train.steps == 7
    cfg = build_config(parse_args(["--set", "model.ema_update=true", "--set", "model.decay=0.9"]))
    assert cfg.model.decay == 0.9 and cfg.model.ema_update is True
    with pytest.raises(ValueError, match="unknown field"):
        build_config(parse_args(["--set", "model.nope=1"]))
    with pytest.raises(ValueError, match="unknown --config"):
        build_config(parse_args(["--config", "imagenet"]))


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
    (["--set", "data.name=shape"], "data.name must be shapes, cub, celebahq, coco or textcaps, got 'shape'"),
    (["--config", "cub"], "dataset 'cub' needs its folder: --data-root DIR"),
    (["--config", "coco", "--image-dir", "/tmp"], "dataset 'coco' needs --image-dir and --annotations"),
    (["--set", "model.quantizer=vqq"], "model.quantizer must be vq or cvq, got 'vqq'"),
    (["--set", "model.ch=16"], "model.ch * model.ch_mult must be multiples of 32"),
    (["--set", "model.ch_mult="], "model.ch_mult must be one or more positive integers"),
    (["--set", "model.mask_ratio_range=0.5,0.1"], "model.mask_ratio_range must be two numbers 0 <= low <= high"),
    (["--set", "train.betas=0.5"], "train.betas must be two numbers in [0, 1)"),
    (["--set", "model.ema_update=false", "--set", "model.decay=0.9"], "model.decay=0.9 only applies to the EMA codebook"),
    (["--set", "model.quantizer=cvq", "--set", "model.decay=0.5"], "model.decay=0.5 applies to the 'vq' quantizer"),
    (["--set", "train.cuda_graph=true", "--set", "model.quantizer_kwargs=none"], "model.quantizer_kwargs must be a dict"),
])
def test_bad_config_names_the_field(argv, culprit):

    with pytest.raises(ConfigError) as info:
        build_config(parse_args(argv))
    assert culprit in str(info.value)


def test_train_validates_configs_built_in_code(tmp_path):

    cfg = preset_config("tiny-cpu")
    cfg.train.out, cfg.train.steps = str(tmp_path), -5
    with pytest.raises(ConfigError, match="train.steps must be a positive integer, got -5"):
        train_mod.train(cfg)
    assert not any(tmp_path.iterdir()), "nothing may be written before the configuration is checked"


def test_quantizer_kwargs_and_output_path_are_checked(tmp_path):

    cfg = preset_config("tiny-cpu")
    cfg.model.quantizer_kwargs = {"threshold_ema_dead_code": 1.0, "foo": 1}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo'\] for quantizer 'vq'"):
        cfg.validate()
    cfg.model.quantizer, cfg.model.quantizer_kwargs = "cvq", {"decay": 0.9, "anchor": "closest"}
    cfg.validate()  # the CVQ's own options
    cfg = preset_config("tiny-cpu")
    (tmp_path / "afile").write_text("x")
    cfg.train.out = str(tmp_path / "afile")
    with pytest.raises(ConfigError, match="is a file"):
        cfg.validate()
    if not torch.cuda.is_available():
        cfg.train.out, cfg.train.device = None, "cuda"
        with pytest.raises(ConfigError, match="no CUDA device"):
            cfg.validate()


def test_quantizer_kwargs_types_are_checked():

    for kwargs, culprit in (({"threshold_ema_dead_code": "1"}, "threshold_ema_dead_code"),
                            ({"threshold_ema_dead_code": -1.0}, "threshold_ema_dead_code"),
                            ({"threshold_ema_dead_code": float("nan")}, "threshold_ema_dead_code"),
                            ({"check_finite": "false"}, "check_finite")):
        cfg = preset_config("tiny-cpu")
        cfg.model.quantizer_kwargs = kwargs
        with pytest.raises(ConfigError, match=culprit):
            cfg.validate()


@pytest.mark.parametrize("argv, culprit", [
    (["--lr", "1e39"], "train.lr"), (["--lr", "nan"], "train.lr"), (["--set", "model.w_ras=inf"], "model.w_ras"),
    (["--set", "model.disc_weight=-1"], "model.disc_weight"), (["--set", "train.dist_timeout=-5"], "dist_timeout"),
], ids=["lr-1e39", "lr-nan", "w_ras-inf", "disc_weight-negative", "dist_timeout-negative"])
def test_absurd_rates_and_weights_are_refused(tmp_path, argv, culprit, capsys):
    with pytest.raises(SystemExit) as info:
        train_mod.cli(TINY + ["--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and culprit in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cuda_graph_config_errors_name_the_field():

    cfg = preset_config("tiny-cpu")
    cfg.train.cuda_graph = True
    with pytest.raises(ConfigError, match="threshold_ema_dead_code"):
        cfg.validate()
    cfg.model.quantizer_kwargs = {}
    cfg.train.compile = True
    with pytest.raises(ConfigError, match="train.compile"):
        cfg.validate()
    cfg.train.compile, cfg.train.device = False, "cpu"
    with pytest.raises(ConfigError, match="CUDA"):
        cfg.validate()
    cfg.train.device = "auto"
    with pytest.raises(ConfigError, match="constant learning rate"):  # tiny-cpu's cosine schedule
        cfg.validate()
    cfg.train.lr_schedule, cfg.train.lr_warmup = "constant", 0
    cfg.validate()


def test_auto_settings_parse_validate_and_resolve():
    """train.cuda_graph / train.channels_last take auto, true or false; "auto" is checked only once the device is
    known (resolve_auto): captured on CUDA with one process and nothing that reads the device on the host,
    channels_last with it; explicit values are kept."""

    cfg = preset_config("cub")
    assert cfg.train.cuda_graph == "auto" and cfg.train.channels_last == "auto"
    for text, want in (("true", True), ("OFF", False), ("auto", "auto"), ("1", True)):
        apply_override(cfg, f"train.cuda_graph={text}")
        assert cfg.train.cuda_graph is want if want != "auto" else cfg.train.cuda_graph == "auto"
    for bad in ("maybe", "none", "2"):
        with pytest.raises(ConfigError, match="train.channels_last"):
            apply_override(cfg, f"train.channels_last={bad}")
    cfg.train.cuda_graph = "yes"
    with pytest.raises(ConfigError, match="train.cuda_graph must be auto, true or false"):
        cfg.validate()

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def resolved(device, world=1, **changes):
        c = preset_config("cub")
        c.data.root = "cub-folder"  # validated as a name only
        c.model.text_encoder, c.model.perceptual_weight = "minilm", 0.0  # the paper setup's opt-outs
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(c, section), name, value)
        c.validate() if device.type == "cpu" else None  # "auto" passes validation anywhere
        names = resolve_auto(c, device, world)
        return c.train.cuda_graph, c.train.channels_last, names

    assert resolved(cuda) == (True, True, ["train.cuda_graph", "train.channels_last"])
    assert resolved(cpu) == (False, False, ["train.cuda_graph", "train.channels_last"])
    assert resolved(cuda, world=2)[:2] == (False, False)
    assert resolved(cuda, train__compile=True)[:2] == (False, False)
    assert resolved(cuda, model__quantizer_kwargs={"threshold_ema_dead_code": 1.0})[:2] == (False, False)
    assert resolved(cuda, model__quantizer_kwargs={"check_finite": True})[:2] == (False, False)
    assert resolved(cuda, train__channels_last=False) == (True, False, ["train.cuda_graph"])
    assert resolved(cuda, train__cuda_graph=False) == (False, False, ["train.channels_last"])
    assert resolved(cpu, train__channels_last=True)[:2] == (False, True)
    # PyTorch's norms would convert around every GroupNorm in channels_last
    assert resolved(cuda, train__norm_impl="native")[:2] == (True, False)
    # asked for where it cannot run: refused once the device and the process count are known
    for device, world in ((cpu, 1), (cuda, 2)):
        c = preset_config("cub")
        c.train.cuda_graph = True
        with pytest.raises(ConfigError, match="train.cuda_graph=true needs CUDA and one process"):
            resolve_auto(c, device, world)
    # the default run (tiny-cpu: dead-code restart) and an explicit request that cannot hold
    c = preset_config("tiny-cpu")
    c.validate()
    assert resolve_auto(c, cuda, 1) and c.train.cuda_graph is False
    c = preset_config("cub")
    c.data.root = "cub-folder"
    c.train.cuda_graph, c.model.quantizer_kwargs = True, {"check_finite": True}
    with pytest.raises(ConfigError, match="check_finite"):
        c.validate()


def test_cuda_graph_true_where_it_cannot_run_touches_nothing(tmp_path, capsys):
    """train.cuda_graph=true on a machine (or process count) where no graph can run is refused before a
    checkpoint folder is touched: a used folder keeps its checkpoints and metrics in place."""

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    run_tiny(tmp_path, "--steps", "2")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true needs CUDA and one process.*device is cpu"):
        run_tiny(tmp_path, "--steps", "4", "--set", "train.cuda_graph=true", "--set", "model.quantizer_kwargs={}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_auto_settings_are_resolved_for_the_run_only(tmp_path):
    """train() resolves "auto" on a copy (the caller's config keeps "auto", so a second train(cfg) resolves it
    again); build_models resolves it too when called on its own; the resolved values reach config.json."""

    cfg = preset_config("tiny-cpu")
    cfg.model.text_encoder = "tiny-random"
    cfg.train.out, cfg.train.steps, cfg.train.progress = str(tmp_path), 1, False
    cfg.train.sample_every = cfg.train.ckpt_every = 0
    train_mod.train(cfg)
    assert cfg.train.cuda_graph == "auto" and cfg.train.channels_last == "auto"
    saved = json.loads((tmp_path / "config.json").read_text())["train"]
    assert saved["cuda_graph"] is False and saved["channels_last"] is False
    _, model, _, opt_g, _, _ = build_models(cfg, torch.device("cpu"), 1)
    assert cfg.train.channels_last is False and cfg.train.cuda_graph is False
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and not opt_g.param_groups[0].get("capturable")


def test_every_flag_sets_the_field_of_its_row():
    """One table (FLAGS) makes both the parser and the overrides: each flag, given, lands in its field and nowhere
    else; a switch sets its value; --help documents every flag."""
    samples = {int: ("7", 7), float: ("0.25", 0.25), str: ("somewhere", "somewhere")}
    defaults = preset_config("tiny-cpu").to_dict()
    for f in FLAGS:
        section, key = f.field.split(".")
        if f.choices:
            argv, want = [f.flag, f.choices[-1]], f.choices[-1]
        elif f.value is not None:
            argv, want = [f.flag], f.value
        else:
            argv, want = [f.flag, samples[f.type][0]], samples[f.type][1]
        args = parse_args(argv)
        for row in FLAGS:
            given = getattr(args, row.dest)
            assert (given not in (None, False)) == (row is f), (f.flag, row.flag)
        cfg_dict = _apply_flags_only(args).to_dict()
        assert cfg_dict[section][key] == want, f.flag
        changed = {(s, k) for s in ("model", "data", "train") for k in cfg_dict[s] if cfg_dict[s][k] != defaults[s][k]}
        assert changed == {(section, key)} | {tuple(n.split(".")) for n, _ in f.also}, (f.flag, changed)
    help_text = " ".join(make_parser().format_help().split())
    for f in FLAGS:
        assert f.flag in help_text and " ".join(f.help.split())[:40] in help_text, f.flag


def _apply_flags_only(args):
    """build_config without its validation (the sample values need not make a valid run)."""
    import lgvq_fast.training.config as config_mod

    saved = config_mod.Config.validate
    config_mod.Config.validate = lambda self: self
    try:
        return build_config(args)
    finally:
        config_mod.Config.validate = saved


def test_presets_point_at_model_presets_and_copy_their_fields():
    from lgvq_fast.models.lgvq import PRESETS as MODEL_PRESETS
    from lgvq_fast.training.config import DATASETS

    for name, p in PRESETS.items():
        assert p.model in MODEL_PRESETS and p.data in DATASETS, name
        cfg = preset_config(name)
        assert cfg.preset == name and cfg.data.name == p.data
        for key, value in p.model_fields.items():
            assert getattr(cfg.model, key) == value, (name, key)
    a, b = preset_config("tiny-cpu"), preset_config("tiny-cpu")
    a.model.quantizer_kwargs["threshold_ema_dead_code"] = 5.0
    assert b.model.quantizer_kwargs == {"threshold_ema_dead_code": 1.0}
    assert preset_config("tiny-cpu").model.quantizer_kwargs == {"threshold_ema_dead_code": 1.0}
    with pytest.raises(ConfigError, match="unknown --config 'imagenet'"):
        preset_config("imagenet")


def test_cuda_graph_needs_a_constant_learning_rate():
    c = preset_config("tiny-cpu")
    c.model.quantizer_kwargs = {}
    c.train.lr_schedule = "cosine"
    assert resolve_auto(c, torch.device("cuda", 0), 1) and c.train.cuda_graph is False
    c = preset_config("tiny-cpu")
    c.model.quantizer_kwargs, c.train.cuda_graph, c.train.lr_warmup = {}, True, 10
    with pytest.raises(ConfigError, match="constant learning rate"):
        c.validate()
    with pytest.raises(ConfigError, match="train.lr_schedule must be constant or cosine"):
        build_config(parse_args(["--set", "train.lr_schedule=linear"]))
