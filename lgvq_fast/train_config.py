"""Training configuration: dataclasses, presets and the command-line overrides of ``lgvq_fast/train.py``.

``--set section.key=value`` writes into the dataclasses (sections ``model``, ``data``, ``train``); the value is
parsed to the field's current type (bool accepts true/false/1/0, tuples take ``1,2,2`` or ``(1,2,2)``,
``none`` clears an optional field).
"""
import ast
import math
import os
from dataclasses import asdict, dataclass, field, fields

from lgvq_fast.models.lgvq import LGVQConfig, preset as model_preset


class ConfigError(ValueError):
    """A bad command line or configuration: the train CLI prints it as one line and exits with status 2."""


@dataclass
class DataConfig:
    name: str = "shapes"
    root: str | None = None
    image_dir: str | None = None
    annotations: str | None = None
    val_image_dir: str | None = None
    val_annotations: str | None = None
    # shapes only: number of distinct train / val images
    train_size: int = 4096
    val_size: int = 256
    max_words: int = 27
    skip_bad_samples: bool = False
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 8
    # None: base_lr x batch x world size, as the official code (spec §5.3: 3.6e-5 at batch 8 on one GPU)
    lr: float | None = None
    base_lr: float = 4.5e-6
    betas: tuple = (0.5, 0.9)
    seed: int = 0
    out: str | None = None
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 1000
    eval_every: int = 0
    log_every: int = 50
    val_batch: int = 32
    resume: str | None = None
    device: str = "auto"
    amp: str = "bf16"
    compile: bool = False
    # what torch.compile covers: "model" (one graph of the whole model) or "blocks" (each VQGAN ResnetBlock and
    # AttnBlock on its own, static shapes: blocks of one shape share their compiled code, so it compiles faster)
    compile_scope: str = "model"
    # "auto", true or false. channels_last: activations and convolution weights in NHWC, the VQGAN's norms as the
    # fused Triton op; "auto": on when the step is captured and norm_impl is not native (H200, paper shape: 62 ms
    # captured against 68 ms NCHW; run eagerly NCHW is the faster, 137 ms against 165 ms). The layout is chosen
    # at start-up: a run whose capture fails (see cuda_graph) goes on eagerly in it
    channels_last: bool | str = "auto"
    # capture the whole step (text encoder, G and D updates) into a CUDA graph and replay it
    # (lgvq_fast/train_graph.py): CUDA, one process, no dead-code restart, no torch.compile. "auto": on where
    # those hold (a capture that fails then warns and the run goes on eagerly); true: required, errors otherwise
    cuda_graph: bool | str = "auto"
    # the VQGAN's GroupNorm + swish: "auto" (the fused Triton op on CUDA for channels_last activations, PyTorch's
    # otherwise), "triton" (the fused op on CUDA in either memory format) or "native" (PyTorch's, always)
    norm_impl: str = "auto"
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its convolution algorithms (the shapes are fixed)
    find_unused_parameters: bool = False
    progress: bool = True
    # seconds a collective may wait for the other ranks before the run stops naming the stalled one;
    # 0: 300 with gloo (CPU), 900 with NCCL
    dist_timeout: float = 0


@dataclass
class Config:
    preset: str = "tiny-cpu"
    model: LGVQConfig = field(default_factory=LGVQConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _tiny_cpu():
    # 32x32 shapes, batch 8, 300 steps: about 2 minutes on 2 idle CPU cores, PSNR rising from ~8 to ~18 dB,
    # the GAN active over the last quarter. EMA codebook with dead-code restart: the plain learned codebook
    # collapses to ~15 % usage in such a short run. Shape captions are at most 12 word-pieces, so 16 text
    # positions suffice.
    model = model_preset("tiny-cpu")
    model.disc_start = 225
    model.max_text_len = 16
    model.ema_update = True
    model.quantizer_kwargs = {"threshold_ema_dead_code": 1.0}
    # Text-loss weights 0.001 (the paper's CUB weights): in bench/alignment_ablation.py (1000 steps, 5 seeds) they
    # raise masked-word accuracy by 24 points and R@1 at unchanged PSNR (+0.01 dB paired); 0.01 costs 0.3 dB and
    # 0.1 costs 1.4 dB.
    model.w_gsa = model.w_mtp = model.w_ras = 0.001
    return Config("tiny-cpu", model, DataConfig(name="shapes", train_size=4096, val_size=256, num_workers=0),
                  TrainConfig(steps=300, batch_size=8, lr=3e-4, ckpt_every=100, sample_every=100,
                              log_every=10, val_batch=64))


def _paper(name, data_name):
    return Config(name, model_preset(name), DataConfig(name=data_name, num_workers=4), TrainConfig())


PRESETS = {
    "tiny-cpu": _tiny_cpu,
    "celebahq": lambda: _paper("celebahq", "celebahq"),
    "celebahq-cvq": lambda: _paper("celebahq-cvq", "celebahq"),
    "cub": lambda: _paper("cub", "cub"),
    "cub-cvq": lambda: _paper("cub-cvq", "cub"),
    "coco": lambda: _paper("coco", "coco"),
    "coco-vqgan": lambda: _paper("coco-vqgan", "coco"),
}


# settings that take auto, true or false
AUTO_BOOL = ("train.channels_last", "train.cuda_graph")


def _parse_value(text, current, name):
    low = text.strip().lower()
    if name in AUTO_BOOL:
        if low == "auto":
            return "auto"
        current = False  # parsed as a boolean below
    if low in ("none", "null"):
        if name in AUTO_BOOL:
            raise ConfigError(f"--set {name}: expected auto, true or false, got {text!r}")
        return None
    if isinstance(current, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {name}: expected {'auto, true or false' if name in AUTO_BOOL else 'a boolean'}, "
                          f"got {text!r}")
    try:
        if isinstance(current, tuple):
            inner = text.strip().strip("()[]")
            return tuple(ast.literal_eval(v.strip()) for v in inner.split(",") if v.strip())
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise ConfigError(f"--set {name}: expected {'a' if kind != 'int' else 'an'} {kind}, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(cfg, assignment):
    """Apply one ``section.key=value`` to ``cfg`` (in place)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in ("model", "data", "train"):
        raise ConfigError(f"--set key must be model.<field>, data.<field> or train.<field>, got {key!r}")
    section = getattr(cfg, parts[0])
    names = {f.name for f in fields(section)}
    if parts[1] not in names:
        raise ConfigError(f"--set {key}: unknown field; {parts[0]} has {sorted(names)}")
    setattr(section, parts[1], _parse_value(value, getattr(section, parts[1]), key))


def build_config(args):
    if args.config not in PRESETS:
        raise ConfigError(f"unknown --config {args.config!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[args.config]()
    flag_map = {
        "steps": ("train", "steps"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
        "out": ("train", "out"), "ckpt_every": ("train", "ckpt_every"), "sample_every": ("train", "sample_every"),
        "eval_every": ("train", "eval_every"), "resume": ("train", "resume"), "seed": ("train", "seed"),
        "num_workers": ("data", "num_workers"), "device": ("train", "device"), "data_root": ("data", "root"),
        "image_dir": ("data", "image_dir"), "annotations": ("data", "annotations"),
        "text_encoder": ("model", "text_encoder"),
    }
    for arg, (section, name) in flag_map.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    if getattr(args, "no_text_losses", False):
        cfg.model.use_text_losses = False
    if getattr(args, "skip_bad_samples", False):
        cfg.data.skip_bad_samples = True
    if getattr(args, "compile", None):
        cfg.train.compile = True
        cfg.train.compile_scope = args.compile
    if getattr(args, "no_progress", False):
        cfg.train.progress = False
    for assignment in getattr(args, "set", []) or []:
        apply_override(cfg, assignment)
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Reject values no run can use, naming the field, before anything is built."""
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.log_every": t.log_every,
                "train.val_batch": t.val_batch, "train.keep_last": t.keep_last,
                "model.codebook_size": m.codebook_size, "model.embed_dim": m.embed_dim,
                "model.resolution": m.resolution, "model.max_text_len": m.max_text_len,
                "data.train_size": d.train_size, "data.val_size": d.val_size}
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in {"train.ckpt_every": t.ckpt_every, "train.sample_every": t.sample_every,
                        "train.eval_every": t.eval_every, "data.num_workers": d.num_workers}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0 (0 turns it off), got {value!r}")
    for name, value in {"train.lr": t.lr, "train.base_lr": t.base_lr}.items():
        # Adam moves each weight by about lr per step: above 1 no run can train (1e39 overflowed at step 1)
        if value is not None and not (_number(value) and 0 < value <= 1):
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    weights = {f"model.{k}": getattr(m, k) for k in ("commitment_weight", "w_gsa", "w_mtp", "w_ras",
                                                      "perceptual_weight", "disc_weight", "disc_factor",
                                                      "codebook_weight", "label_smoothing", "dropout",
                                                      "mtp_dropout")}
    for name, value in weights.items():
        if not (_number(value) and 0 <= value <= 1e4):
            raise ConfigError(f"{name} must be a finite number in [0, 1e4], got {value!r}")
    for name in ("model.label_smoothing", "model.dropout", "model.mtp_dropout"):
        if weights[name] >= 1:
            raise ConfigError(f"{name} must be below 1, got {weights[name]!r}")
    if not (_number(m.decay) and 0 <= m.decay < 1):
        raise ConfigError(f"model.decay must be a number in [0, 1), got {m.decay!r}")
    if not (_number(t.dist_timeout) and 0 <= t.dist_timeout <= 86400):
        raise ConfigError(f"train.dist_timeout must be seconds in [0, 86400] (0: 300 with gloo, 900 with NCCL), got "
                          f"{t.dist_timeout!r}")
    if t.compile_scope not in ("model", "blocks"):
        raise ConfigError(f"train.compile_scope (--compile SCOPE) must be model or blocks, got {t.compile_scope!r}")
    for name in AUTO_BOOL:
        value = getattr(t, name.split(".")[1])
        if not (value is True or value is False or value == "auto"):
            raise ConfigError(f"{name} must be auto, true or false, got {value!r}")
    if t.cuda_graph is True:  # asked for: every condition must hold ("auto" checks them when the device is known)
        if t.compile:
            raise ConfigError("train.cuda_graph=true and train.compile (--compile) exclude each other: the captured "
                              "step replays eager kernels; pick one")
        if t.device == "cpu":
            raise ConfigError("train.cuda_graph=true needs a CUDA device, got --device cpu")
        host_read = _host_read(m)
        if host_read:
            raise ConfigError(f"train.cuda_graph=true cannot capture {host_read[1]}: set model.quantizer_kwargs "
                              f"without {host_read[0]}")
    if t.norm_impl not in ("auto", "native", "triton"):
        raise ConfigError(f"train.norm_impl must be auto, native or triton, got {t.norm_impl!r}")
    if t.amp not in ("bf16", "none"):
        raise ConfigError(f"train.amp must be bf16 (autocast on GPU) or none, got {t.amp!r}")
    if t.device not in ("auto", "cpu", "cuda") and not str(t.device).startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {t.device!r}")
    if d.name not in ("shapes", "cub", "celebahq", "coco"):
        raise ConfigError(f"data.name must be shapes, cub, celebahq or coco, got {d.name!r}")
    if d.name in ("cub", "celebahq") and not d.root:
        raise ConfigError(f"dataset {d.name!r} needs its folder: --data-root DIR")
    if d.name == "coco" and not (d.image_dir and d.annotations):
        raise ConfigError("dataset 'coco' needs --image-dir and --annotations")
    if m.quantizer not in ("vq", "cvq"):
        raise ConfigError(f"model.quantizer must be vq or cvq, got {m.quantizer!r}")
    if not isinstance(m.quantizer_kwargs, dict):
        raise ConfigError(f"model.quantizer_kwargs must be a dict, got {m.quantizer_kwargs!r}")
    _check_quantizer_kwargs(m)
    if not (isinstance(m.ch, int) and not isinstance(m.ch, bool) and m.ch > 0):
        raise ConfigError(f"model.ch must be a positive integer, got {m.ch!r}")
    mult = tuple(m.ch_mult) if isinstance(m.ch_mult, (tuple, list)) else ()
    if not mult or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in mult):
        raise ConfigError(f"model.ch_mult must be one or more positive integers, got {m.ch_mult!r}")
    if any((m.ch * v) % 32 for v in mult):
        raise ConfigError(f"model.ch * model.ch_mult must be multiples of 32 (GroupNorm with 32 groups), got ch={m.ch}, "
                          f"ch_mult={mult}")
    if not (_numbers(m.mask_ratio_range, 2) and 0.0 <= m.mask_ratio_range[0] <= m.mask_ratio_range[1] <= 1.0):
        raise ConfigError(f"model.mask_ratio_range must be two numbers 0 <= low <= high <= 1, got "
                          f"{m.mask_ratio_range!r}")
    if not (_numbers(t.betas, 2) and all(0.0 <= b < 1.0 for b in t.betas)):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas!r}")
    if t.device != "auto" and str(t.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {t.device}: this machine has no CUDA device available to torch")
    if t.out and os.path.exists(t.out) and not os.path.isdir(t.out):
        raise ConfigError(f"--out {t.out} is a file; the run's output folder must be a directory")
    factor = 2 ** (len(m.ch_mult) - 1)
    if m.resolution % factor:
        raise ConfigError(f"model.resolution {m.resolution} is not divisible by 2**(len(ch_mult) - 1) = {factor} "
                          f"(ch_mult {tuple(m.ch_mult)})")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _host_read(m):
    """(quantizer kwarg, what it does) when the quantizer reads the device on the host every step, else None."""
    kwargs = m.quantizer_kwargs if isinstance(m.quantizer_kwargs, dict) else {}
    if kwargs.get("threshold_ema_dead_code", 0) > 0:
        return "threshold_ema_dead_code", "the dead-code restart (it counts dead codes on the host every step)"
    if kwargs.get("check_finite", False):
        return "check_finite", "the quantizer's finite check (it reads a flag on the host every step)"
    return None


def resolve_auto(cfg, device, world):
    """Turn the "auto" settings into true or false for this run (``device``: a torch.device, ``world``: the
    number of processes); returns the names of those resolved. The step is captured in a CUDA graph when it can
    be (CUDA, one process, no torch.compile, no dead-code restart or finite check in the quantizer, which read
    the device on the host every step); channels_last follows the graph (faster captured, slower eager)."""
    t = cfg.train
    resolved = []
    if t.cuda_graph == "auto":
        t.cuda_graph = (device.type == "cuda" and world == 1 and not t.compile and _host_read(cfg.model) is None)
        resolved.append("train.cuda_graph")
    elif t.cuda_graph is True and (device.type != "cuda" or world > 1):
        # before anything is built or a checkpoint folder touched
        where = f"{world} processes" if world > 1 else f"the device is {device}"
        raise ConfigError(f"train.cuda_graph=true needs CUDA and one process, but {where} (use "
                          "train.cuda_graph=auto to capture only where it can run)")
    if t.channels_last == "auto":
        # with PyTorch's norms (train.norm_impl=native) channels_last would convert around every GroupNorm
        t.channels_last = bool(t.cuda_graph) and t.norm_impl != "native"
        resolved.append("train.channels_last")
    return resolved


def _numbers(value, n):
    return (isinstance(value, (tuple, list)) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _check_quantizer_kwargs(m):
    """Unknown keys of model.quantizer_kwargs name themselves here instead of in a TypeError at build time."""
    import inspect

    # the arguments the builder sets from the model config (lgvq_fast.models.lgvq._build_quantizer)
    if m.quantizer == "vq":
        from lgvq_fast.quantize import VectorQuantizer as cls

        taken = {"self", "dim", "codebook_size", "commitment_weight", "legacy", "use_cosine_sim", "ema_update",
                 "decay", "channel_last"}
    else:
        from lgvq_fast.quantize_cvq import CVQVectorQuantizer as cls

        taken = {"self", "dim", "codebook_size", "commitment_weight", "channel_last"}
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k, p in params.items() if k not in taken and p.kind != p.VAR_KEYWORD)
    unknown = sorted(set(m.quantizer_kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"model.quantizer_kwargs: unknown key(s) {unknown} for quantizer {m.quantizer!r}; "
                          f"allowed: {allowed}")
    kw = m.quantizer_kwargs
    v = kw.get("threshold_ema_dead_code", 0)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ConfigError(f"model.quantizer_kwargs: threshold_ema_dead_code must be a number >= 0 (0: no restart), "
                          f"got {v!r}")
    if not isinstance(kw.get("check_finite", False), bool):
        raise ConfigError(f"model.quantizer_kwargs: check_finite must be true or false, got {kw['check_finite']!r}")


def config_to_dict(cfg):
    return {"preset": cfg.preset, "model": asdict(cfg.model), "data": asdict(cfg.data), "train": asdict(cfg.train)}
