"""Training configuration: the dataclasses, the preset table and the command line of ``lgvq_fast/train.py``.

A preset names a model preset (``lgvq_fast.models.lgvq.PRESETS``) and a dataset, with the fields it changes.
Every command-line flag is one row of :data:`FLAGS`, from which both the argparse parser and the overrides are
made. ``--set section.key=value`` writes into the dataclasses (sections ``model``, ``data``, ``train``); the value
is parsed to the field's current type (bool accepts true/false/1/0, tuples take ``1,2,2`` or ``(1,2,2)``,
``none`` clears an optional field). Each dataclass validates its own fields (``validate()``), and
:meth:`Config.validate` the settings that depend on each other.
"""
import argparse
import ast
import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields

from lgvq_fast._fields import are_numbers, check_choice, check_ints, check_range, is_number
from lgvq_fast.errors import ConfigError
from lgvq_fast.models.lgvq import LGVQConfig, preset as model_preset

DATASETS = ("shapes", "cub", "celebahq", "coco", "textcaps")


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
    # datasets read from an annotation file (coco) without val_annotations: the fraction of the training images
    # held out for validation (0: refuse to validate on training images)
    val_holdout: float = 0.0

    def validate(self):
        check_ints(self, "data", ("train_size", "val_size"), least=1)
        check_ints(self, "data", ("num_workers",), least=0)
        check_choice(self, "data", "name", DATASETS)
        check_range(self, "data", ("val_holdout",), 0, 0.5, "a fraction in [0, 0.5] (0: no held-out images)")
        if self.name in ("cub", "celebahq", "textcaps") and not self.root:
            raise ConfigError(f"dataset {self.name!r} needs its folder: --data-root DIR")
        if self.name == "coco" and not (self.image_dir and self.annotations):
            raise ConfigError("dataset 'coco' needs --image-dir and --annotations")
        from lgvq_fast.training.loaders import val_sources

        try:  # the validation set: never the training images silently
            val_sources(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


# settings that take auto, true or false
AUTO_BOOL = ("train.channels_last", "train.cuda_graph")


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 8
    # None: base_lr x batch x world size, as the official code (spec §5.3: 3.6e-5 at batch 8 on one GPU)
    lr: float | None = None
    base_lr: float = 4.5e-6
    betas: tuple = (0.5, 0.9)
    # "constant" (the official code) or "cosine" (decays to lr_floor x lr at train.steps), after lr_warmup steps of
    # linear warm-up; a function of the step, so resume follows it exactly
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_floor: float = 0.1
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
    # fused Triton op; "auto": on when the step is captured and norm_impl is not native (docs/training.md has the
    # measurements behind that choice). The layout is chosen at start-up: a run whose capture fails (see
    # cuda_graph) goes on eagerly in it
    channels_last: bool | str = "auto"
    # capture the whole step (text encoder, G and D updates) into a CUDA graph and replay it
    # (lgvq_fast/training/cuda_graph.py): CUDA, one process, no dead-code restart, no torch.compile. "auto": on
    # where those hold (a capture that fails then warns and the run goes on eagerly); true: required, errors
    # otherwise
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

    def validate(self):
        check_ints(self, "train", ("steps", "batch_size", "log_every", "val_batch", "keep_last"), least=1)
        check_ints(self, "train", ("ckpt_every", "sample_every", "eval_every", "lr_warmup"), least=0)
        check_choice(self, "train", "lr_schedule", ("constant", "cosine"))
        check_range(self, "train", ("lr_floor",), 0, 1, "a fraction in [0, 1]")
        # Adam moves each weight by about lr per step: above 1 no run can train (1e39 overflowed at step 1)
        for name in ("lr", "base_lr"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 < value <= 1):
                raise ConfigError(f"train.{name} must be a number in (0, 1], got {value!r}")
        if not (are_numbers(self.betas, 2) and all(0.0 <= b < 1.0 for b in self.betas)):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_range(self, "train", ("dist_timeout",), 0, 86400,
                    "seconds in [0, 86400] (0: 300 with gloo, 900 with NCCL)")
        check_choice(self, "train", "compile_scope", ("model", "blocks"),
                     "model or blocks (--compile SCOPE)")
        for name in AUTO_BOOL:
            value = getattr(self, name.split(".")[1])
            if not (value is True or value is False or value == "auto"):
                raise ConfigError(f"{name} must be auto, true or false, got {value!r}")
        check_choice(self, "train", "norm_impl", ("auto", "native", "triton"))
        check_choice(self, "train", "amp", ("bf16", "none"), "bf16 (autocast on GPU) or none")
        self._validate_places()
        return self

    def _validate_places(self):
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device != "auto" and str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: this machine has no CUDA device available to torch")
        if self.out and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out} is a file; the run's output folder must be a directory")


@dataclass
class Config:
    preset: str = "tiny-cpu"
    model: LGVQConfig = field(default_factory=LGVQConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        """Every section's own checks, then the settings that depend on each other; returns ``self``."""
        self.train.validate()
        self.data.validate()
        self.model.validate()
        t = self.train
        if t.cuda_graph is True:  # asked for: every condition must hold ("auto" checks them when the device is known)
            if t.compile:
                raise ConfigError("train.cuda_graph=true and train.compile (--compile) exclude each other: the "
                                  "captured step replays eager kernels; pick one")
            if t.device == "cpu":
                raise ConfigError("train.cuda_graph=true needs a CUDA device, got --device cpu")
            host_read = host_reads(self.model)
            if host_read:
                raise ConfigError(f"train.cuda_graph=true cannot capture {host_read[1]}: set model.quantizer_kwargs "
                                  f"without {host_read[0]}")
            if t.lr_schedule != "constant" or t.lr_warmup:
                raise ConfigError("train.cuda_graph=true replays a constant learning rate: set train.lr_schedule=constant "
                                  "and train.lr_warmup=0, or train.cuda_graph=auto")
        self._check_paper_setup()
        return self

    def paper_deviations(self):
        """How a paper preset's run differs from the paper's setup (CLIP ViT-B/32 text tower, LPIPS), as opted out
        of on the command line; empty for the other presets."""
        preset = PRESETS.get(self.preset)
        if preset is None or not preset.paper:
            return []
        out = []
        if not _is_clip(self.model.text_encoder):
            out.append(f"text encoder {self.model.text_encoder} instead of CLIP ViT-B/32")
        if not self.model.perceptual_weight > 0:
            out.append("no LPIPS perceptual loss")
        return out

    def _check_paper_setup(self):
        """A paper preset trains the paper's setup or says why not: CLIP's text tower and LPIPS need local files;
        without them the run stops here, before anything is built, naming both ways out."""
        m = self.model
        missing = []
        if m.text_encoder == "clip":
            from lgvq_fast.models.text import CLIP_RECIPE

            missing.append(f"CLIP ViT-B/32's text tower: pass its local folder with --text-encoder DIR ({CLIP_RECIPE})"
                           ", or train with the packaged MiniLM: --text-encoder minilm")
        preset = PRESETS.get(self.preset)
        if preset is not None and preset.paper and m.perceptual_weight > 0 and not m.lpips_path:
            missing.append("the LPIPS perceptual loss: pass its weights with --lpips FILE (made once from torchvision's "
                           "VGG16 and the LPIPS v0.1 vgg heads: the recipe is in lgvq_fast/models/perceptual.py), or "
                           "train without it: --no-perceptual")
        if missing:
            raise ConfigError(f"preset {self.preset} trains the paper's setup, which needs " + "; and ".join(missing)
                              + " (an opt-out is recorded in config.json and the start-up line)")
        if m.lpips_path and m.perceptual_weight > 0 and not os.path.isfile(m.lpips_path):
            raise ConfigError(f"--lpips {m.lpips_path}: no such file")
        if m.text_encoder not in ("minilm", "tiny-random") and not os.path.isdir(m.text_encoder):
            raise ConfigError(f"--text-encoder {m.text_encoder}: not minilm, tiny-random or a local model folder")

    def describe(self, world, device, lr):
        """The run's start-up line."""
        m, t = self.model, self.train
        deviations = self.paper_deviations()
        return (f"config {self.preset}: {world} process(es) on {device}, {m.resolution}px, K={m.codebook_size}, "
                f"batch {t.batch_size}x{world}, lr {lr:.3g}, steps {t.steps}, text losses "
                f"{'on' if m.use_text_losses else 'off'}{', step captured in a CUDA graph' if t.cuda_graph else ''}"
                f"{', channels_last' if t.channels_last else ''}"
                + (f" (not the paper's setup: {'; '.join(deviations)})" if deviations else ""))

    def write_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def to_dict(self):
        out = {"preset": self.preset, "model": asdict(self.model), "data": asdict(self.data),
               "train": asdict(self.train)}
        deviations = self.paper_deviations()
        if deviations:
            out["paper_deviations"] = deviations
        return out


@dataclass(frozen=True)
class Preset:
    """A training preset: the model preset it starts from, the dataset, and the fields it sets on each section."""

    model: str
    data: str
    paper: bool = False  # the paper's setup: CLIP ViT-B/32's text tower and LPIPS, or an explicit opt-out
    model_fields: dict = field(default_factory=dict)
    data_fields: dict = field(default_factory=dict)
    train_fields: dict = field(default_factory=dict)

    def build(self, name):
        """A fresh ``Config`` (its dicts copied: changing them never changes the preset)."""
        f = copy.deepcopy((self.model_fields, self.data_fields, self.train_fields))
        return Config(name, model_preset(self.model, **f[0]), DataConfig(name=self.data, **f[1]), TrainConfig(**f[2]))


# tiny-cpu: 32x32 shapes, under 3 minutes of training on 2 CPU cores reaching a validation PSNR above 25 dB with every
# shape's colour and kind legible in the reconstructions (docs/training.md has the measurements behind each choice):
# downsampling 2 (16x16 codes; at 4 the same time gives about 22 dB), K = 512 (at 128 small crosses and diamonds
# come back as blobs more often), 640 steps, one f_vt and one MTP layer (the MTP cross-attention over 257 visual
# tokens is much of the text losses' cost), learning rate 8e-4 with a cosine decay (1.2e-3 gave 20 dB), and the GAN
# off (disc_start past the run: in so short a run it costs PSNR before it sharpens anything). EMA codebook with
# dead-code restart: the plain learned codebook collapses to ~15 % usage in such a short run. Shape captions are at
# most 12 word-pieces, so 16 text positions suffice. Text-loss weights 0.001, the paper's CUB weights
# (bench/alignment_ablation.py measures what they do).
PRESETS = {
    "tiny-cpu": Preset("tiny-cpu", "shapes",
                       model_fields=dict(ch_mult=(1, 2), vt_layers=1, mtp_layers=1, disc_start=100_000,
                                         max_text_len=16, ema_update=True, codebook_size=512,
                                         quantizer_kwargs={"threshold_ema_dead_code": 1.0},
                                         w_gsa=0.001, w_mtp=0.001, w_ras=0.001),
                       data_fields=dict(train_size=4096, val_size=256, num_workers=1),
                       train_fields=dict(steps=640, batch_size=8, lr=8e-4, lr_schedule="cosine", lr_warmup=20,
                                         ckpt_every=100, sample_every=100, eval_every=50, log_every=10,
                                         val_batch=64)),
    # the paper's datasets and models; text_encoder "clip" stands for the local CLIP folder the user must give
    **{name: Preset(name, data, paper=True, model_fields=dict(text_encoder="clip"), data_fields=dict(num_workers=4))
       for name, data in (("celebahq", "celebahq"), ("celebahq-cvq", "celebahq"), ("cub", "cub"),
                          ("cub-cvq", "cub"), ("coco", "coco"), ("coco-vqgan", "coco"), ("textcaps", "textcaps"),
                          ("textcaps-cvq", "textcaps"))},
}


def preset_config(name):
    """A fresh ``Config`` of the training preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --config {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].build(name)


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets. ``value``: for a switch (no argument), the value the
    field gets when the flag is given; ``also``: further fields the flag sets."""

    flag: str
    field: str
    help: str
    type: type = str
    value: object = None
    choices: tuple = ()
    also: tuple = ()

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")


FLAGS = (
    Flag("--steps", "train.steps", "total optimizer steps of the run (train.steps)", int),
    Flag("--batch-size", "train.batch_size", "images per step per process (train.batch_size)", int),
    Flag("--lr", "train.lr", "Adam learning rate of both networks (train.lr; default base_lr x batch x processes)",
         float),
    Flag("--out", "train.out", "output folder: checkpoints, samples, metrics (train.out; default runs/<preset>)"),
    Flag("--ckpt-every", "train.ckpt_every", "write a checkpoint every N steps, 0 = only at the end", int),
    Flag("--sample-every", "train.sample_every", "save a reconstruction grid every N steps, 0 = only at the end", int),
    Flag("--eval-every", "train.eval_every", "validation PSNR every N steps, 0 = only at start and end", int),
    Flag("--resume", "train.resume", "checkpoint path, or 'auto' for the latest in the output folder"),
    Flag("--seed", "train.seed", "seed of the model init, data order and every step's draws", int),
    Flag("--no-text-losses", "model.use_text_losses", "baseline: train without the LG-VQ text losses", value=False),
    Flag("--skip-bad-samples", "data.skip_bad_samples",
         "skip and count unreadable images or captions instead of stopping", value=True),
    Flag("--num-workers", "data.num_workers", "DataLoader worker processes per rank (data.num_workers)", int),
    Flag("--device", "train.device", "auto (default: cuda when available), cpu, cuda or cuda:N"),
    Flag("--compile", "train.compile_scope",
         "torch.compile the model (before the DDP wrap): the whole model as one graph (default), or each VQGAN "
         "block on its own ('--compile blocks': compiles faster)", value="model", choices=("model", "blocks"),
         also=(("train.compile", True),)),
    Flag("--data-root", "data.root", "dataset folder (CUB, CelebA-HQ, TextCaps)"),
    Flag("--image-dir", "data.image_dir", "COCO image folder"),
    Flag("--annotations", "data.annotations", "COCO captions annotation JSON"),
    Flag("--text-encoder", "model.text_encoder",
         "a local CLIP ViT-B/32 folder (the paper presets need one), minilm (the packaged MiniLM; tiny-cpu's default) "
         "or tiny-random"),
    Flag("--lpips", "model.lpips_path", "LPIPS weights file (the paper presets need one; lgvq_fast/models/perceptual.py)"),
    Flag("--no-perceptual", "model.perceptual_weight", "train without the LPIPS perceptual loss", value=0.0),
    Flag("--no-progress", "train.progress", "no tqdm progress bar (log lines only)", value=False),
)


def make_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny-cpu", help="preset: " + ", ".join(PRESETS) + " (default tiny-cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.codebook_size=512 --set train.log_every=5")
    for f in FLAGS:
        if f.choices:  # an optional argument: the flag alone gives ``value``
            p.add_argument(f.flag, nargs="?", const=f.value, choices=f.choices, default=None, help=f.help)
        elif f.value is not None:
            p.add_argument(f.flag, action="store_true", help=f.help)
        else:
            p.add_argument(f.flag, type=f.type, help=f.help)
    return p


def parse_args(argv=None, description=None):
    return make_parser(description).parse_args(argv)


def build_config(args):
    """The validated config of parsed command-line ``args``: the preset, then each flag given, then ``--set``."""
    cfg = preset_config(args.config)
    for f in FLAGS:
        given = getattr(args, f.dest, None)
        if given is None or given is False:
            continue
        value = f.value if (f.value is not None and not f.choices) else given
        for name, v in ((f.field, value),) + f.also:
            section, key = name.split(".")
            setattr(getattr(cfg, section), key, v)
    for assignment in getattr(args, "set", []) or []:
        apply_override(cfg, assignment)
    return cfg.validate()


def apply_override(cfg, assignment, fixed=None):
    """Apply one ``section.key=value`` to ``cfg`` (in place; ``cfg`` has ``model``, ``data`` and ``train``
    dataclass sections). ``fixed``: ``{"section.key": why}`` of the fields no ``--set`` may change."""
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
    if fixed and ".".join(parts) in fixed:
        raise ConfigError(f"--set {key}: {fixed['.'.join(parts)]}")
    setattr(section, parts[1], _parse_value(value, getattr(section, parts[1]), key))


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
        return _parse_bool(low, text, name)
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


def _parse_bool(low, text, name):
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--set {name}: expected {'auto, true or false' if name in AUTO_BOOL else 'a boolean'}, "
                      f"got {text!r}")


def _is_clip(text_encoder):
    """True for a local folder holding a CLIP model (its config.json's model_type)."""
    path = os.path.join(str(text_encoder), "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f).get("model_type", "")).startswith("clip")
    except (OSError, ValueError):
        return False


def host_reads(m):
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
        t.cuda_graph = (device.type == "cuda" and world == 1 and not t.compile and host_reads(cfg.model) is None
                        and t.lr_schedule == "constant" and not t.lr_warmup)
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
