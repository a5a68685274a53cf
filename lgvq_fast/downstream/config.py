"""Configuration of a downstream run: the transformer (``model``: ``CodeTransformerConfig``), the data
(``data``: which dataset, which frozen tokenizer, where its codes are cached) and the run (``train``), with presets
and the command line ``lgvq_fast/downstream/train.py`` reads (``--config``, flags, ``--set section.key=value``).

The vocabulary and sequence sizes of ``model`` (``image_vocab_size``, ``max_image_tokens``, ``image_width``,
``text_vocab_size``, ``max_text_tokens``) are not settings: they come from the tokenizer checkpoint (its codebook,
grid and ``max_text_len``) and the training captions (the text vocabulary, ``tasks.TextVocab``) when the run
starts.
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass, field

from lgvq_fast._fields import check_choice, check_ints, check_range, is_int
from lgvq_fast.downstream.model import TASKS, CodeTransformerConfig
from lgvq_fast.errors import ConfigError

# the model fields the tokenizer fixes
TOKENIZER_FIELDS = ("image_vocab_size", "max_image_tokens", "image_width", "text_vocab_size", "max_text_tokens")


@dataclass
class DownstreamData:
    tokenizer: str = ""  # the frozen tokenizer's training checkpoint (required)
    name: str = "shapes"  # shapes, cub, celebahq, textcaps, coco
    train_size: int | None = 4096  # shapes: images per split (folders: None = all)
    val_size: int | None = 256
    seed: int = 0  # the dataset's seed (shapes: which scenes; folders: caption draws)
    root: str | None = None
    image_dir: str | None = None
    annotations: str | None = None
    val_image_dir: str | None = None
    val_annotations: str | None = None
    cache_dir: str = os.path.join("runs", "codes")  # extracted codes, one folder per (tokenizer, dataset, split)
    num_workers: int = 0

    def validate(self):
        if not self.tokenizer:
            raise ConfigError("a downstream run needs the frozen tokenizer: --tokenizer CKPT (a checkpoint that "
                              "lgvq_fast/train.py wrote, e.g. runs/tiny-cpu/checkpoints/step_0000640.pt)")
        for name in ("train_size", "val_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"data.{name} must be None (all) or a positive integer, got {value!r}")
        check_ints(self, "data", ("num_workers", "seed"), 0)
        check_choice(self, "data", "name", ("shapes", "cub", "celebahq", "textcaps", "coco"))
        return self

    def spec(self, split):
        """The dataset description the code cache is keyed by (everything that changes the images or captions)."""
        val = split != "train"
        image_dir = (self.val_image_dir or self.image_dir) if val else self.image_dir
        annotations = (self.val_annotations or self.annotations) if val else self.annotations
        size = self.val_size if val else self.train_size
        return {"name": self.name, "size": size, "seed": self.seed, "root": self.root, "image_dir": image_dir,
                "annotations": annotations}


@dataclass
class DownstreamTrain:
    task: str = "caption"  # caption or t2i
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    lr_warmup: int = 50
    lr_floor: float = 0.1  # cosine decay to lr * lr_floor
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # default runs/downstream-<task>
    resume: str | None = None  # a checkpoint path or "auto"
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 20
    eval_every: int = 0  # 0: only at the end
    eval_size: int = 128  # validation images (captions or prompts) the task metrics use
    eval_batch: int = 64
    # t2i sampling of the evaluation and the sample grid
    top_k: int | None = None
    top_p: float | None = 0.9
    temperature: float = 1.0
    cfg_scale: float | None = None
    probe: str | None = None  # shapes t2i: a probe file (default: trained once and cached in data.cache_dir)
    inception: str | None = None  # local Inception weights for FID (t2i), as python -m lgvq_fast.eval takes
    progress: bool = True
    dist_timeout: int = 0

    def validate(self):
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {sorted(TASKS)}, got {self.task!r}")
        check_ints(self, "train", ("steps", "batch_size", "log_every", "eval_size", "eval_batch", "keep_last"), 1)
        check_ints(self, "train", ("lr_warmup", "ckpt_every", "eval_every", "seed", "dist_timeout"), 0)
        check_range(self, "train", ("lr", "temperature"), 1e-12, float("inf"), "a number > 0")
        check_range(self, "train", ("weight_decay", "grad_clip"), 0, float("inf"), "a number >= 0 (0 turns it off)")
        check_range(self, "train", ("lr_floor",), 0, 1, "a number in [0, 1]")
        check_choice(self, "train", "amp", ("auto", "bf16", "fp32"))
        if self.top_p is not None:
            check_range(self, "train", ("top_p",), 1e-9, 1, "None or a number in (0, 1]")
        if self.top_k is not None:
            check_ints(self, "train", ("top_k",), 1)
        if self.cfg_scale is not None:
            check_range(self, "train", ("cfg_scale",), -1e6, 1e6, "None or a finite number")
        return self


@dataclass
class DownstreamConfig:
    preset: str = "tiny-cpu"
    model: CodeTransformerConfig = field(default_factory=CodeTransformerConfig)
    data: DownstreamData = field(default_factory=DownstreamData)
    train: DownstreamTrain = field(default_factory=DownstreamTrain)

    def validate(self):
        self.data.validate()
        self.train.validate()
        self.model.validate()
        if self.train.cfg_scale is not None and self.model.p_uncond == 0:
            raise ConfigError("train.cfg_scale needs model.p_uncond > 0 (the null prefix guidance samples from)")
        return self

    @property
    def out_dir(self):
        return self.train.out or os.path.join("runs", f"downstream-{self.train.task}")

    def to_dict(self):
        return {"preset": self.preset, "model": asdict(self.model), "data": asdict(self.data),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(preset=d.get("preset", "custom"), model=CodeTransformerConfig.from_dict(d["model"]),
                       data=DownstreamData(**d["data"]), train=DownstreamTrain(**d["train"]))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a downstream config: {type(exc).__name__}: {exc}") from exc

    def write_json(self, path):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)


# tiny-cpu: the shapes data on a 2-core CPU in a few minutes per task (bench/downstream_ablation.py runs it for
# tokenizers trained with and without the text losses). shapes: the same data at a GPU size. cub / coco: the
# paper's datasets over a tokenizer trained on them.
PRESETS = {
    "tiny-cpu": dict(model=dict(n_layer=2, n_head=4, d_model=96, dropout=0.0, p_uncond=0.1),
                     data=dict(name="shapes", train_size=4096, val_size=256),
                     train=dict(steps=800, batch_size=16, lr=2e-3, lr_warmup=40, eval_size=128)),
    "shapes": dict(model=dict(n_layer=8, n_head=8, d_model=512, dropout=0.1, p_uncond=0.1),
                   data=dict(name="shapes", train_size=65536, val_size=1024, num_workers=2),
                   train=dict(steps=20000, batch_size=64, lr=3e-4, lr_warmup=500, eval_every=2000, eval_size=512,
                              ckpt_every=2000)),
    **{name: dict(model=dict(n_layer=12, n_head=12, d_model=768, dropout=0.1, p_uncond=0.1),
                  data=dict(name=name, train_size=None, val_size=None, num_workers=4),
                  train=dict(steps=100_000, batch_size=32, lr=3e-4, lr_warmup=2000, eval_every=5000, eval_size=1000,
                             ckpt_every=5000))
       for name in ("cub", "coco")},
}


def preset_config(name):
    if name not in PRESETS:
        raise ConfigError(f"unknown --config {name!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[name]
    return DownstreamConfig(preset=name, model=CodeTransformerConfig(**p["model"]),
                            data=DownstreamData(**p["data"]), train=DownstreamTrain(**p["train"]))


# (flag, config field, type, help); a type of bool makes a switch that sets the field to False when given
FLAGS = (
    ("--tokenizer", "data.tokenizer", str, "the frozen tokenizer: a checkpoint lgvq_fast/train.py wrote (required)"),
    ("--task", "train.task", str, "caption (codes -> caption) or t2i (caption -> codes)"),
    ("--steps", "train.steps", int, "total optimizer steps"),
    ("--batch-size", "train.batch_size", int, "sequences per step per process"),
    ("--lr", "train.lr", float, "AdamW peak learning rate (warm-up, then cosine decay)"),
    ("--seed", "train.seed", int, "seed of the init, the data order and every step's draws"),
    ("--out", "train.out", str, "output folder (default runs/downstream-<task>)"),
    ("--resume", "train.resume", str, "a checkpoint path, or 'auto' for the latest in the output folder"),
    ("--device", "train.device", str, "auto (cuda when available), cpu, cuda or cuda:N"),
    ("--cache-dir", "data.cache_dir", str, "where the tokenizer's codes are extracted once per dataset"),
    ("--data-root", "data.root", str, "dataset folder (CUB, CelebA-HQ, TextCaps)"),
    ("--image-dir", "data.image_dir", str, "COCO image folder"),
    ("--annotations", "data.annotations", str, "COCO captions annotation JSON"),
    ("--probe", "train.probe", str, "shapes t2i: the probe file that reads generated images (default: trained once "
                                    "into the cache folder)"),
    ("--inception", "train.inception", str, "local Inception weights: FID of the generated images (t2i)"),
    ("--ckpt-every", "train.ckpt_every", int, "checkpoint every N steps, 0 = only at the end"),
    ("--eval-every", "train.eval_every", int, "task metrics every N steps, 0 = only at the end"),
    ("--no-progress", "train.progress", bool, "no tqdm progress bar"),
)


def make_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny-cpu", help="preset: " + ", ".join(PRESETS) + " (default tiny-cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.n_layer=4 --set train.top_k=20")
    for flag, _, kind, help_text in FLAGS:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            p.add_argument(flag, type=kind, help=help_text)
    return p


def build_config(args):
    """The validated config of parsed ``args``: the preset, then each flag given, then each ``--set``."""
    from lgvq_fast.training.config import apply_override

    cfg = preset_config(args.config)
    for flag, name, kind, _ in FLAGS:
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if given is None or given is False:
            continue
        section, key = name.split(".")
        setattr(getattr(cfg, section), key, False if kind is bool else given)
    fixed = {f"model.{name}": "set by the tokenizer checkpoint (its codebook and grid) and the training captions"
             for name in TOKENIZER_FIELDS}
    for assignment in args.set or []:
        apply_override(cfg, assignment, fixed)
    return cfg.validate()
