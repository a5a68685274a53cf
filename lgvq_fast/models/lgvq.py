"""The LG-VQ tokenizer (generator side): VQGAN + quantizer + Semantic and Relationship Alignment Modules.

``LGVQ.forward(images, text, text_feats)`` runs the whole generator once per step; the trainer feeds the
discriminator ``out["x_rec"].detach()`` from the same forward (no second forward, spec §8 B8). The frozen
text encoder is not a submodule: the trainer calls ``text_encoder.encode(text, cfg.mask_input)`` once per
batch and passes the result as ``text_feats``. Whichever ``mask_input`` was used, the MTP decoder input at
masked positions is the learned per-position mask vector; GSA uses the unmasked caption's global feature and
RAM the unmasked caption's token features (``TextFeatures.token_feats_full``; a plain 2-tuple is taken as
coming from the unmasked caption).
"""
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn

from lgvq_fast._fields import are_numbers, check_choice, check_ints, check_range, is_int, is_number
from lgvq_fast.errors import ConfigError
from lgvq_fast.models._nvtx import nvtx_range
from lgvq_fast.models.ram import RelationAlignment
from lgvq_fast.models.sam import SemanticAlignment, gsa_loss
from lgvq_fast.models._precast import precast_weights
from lgvq_fast.models.vqgan import Conv2d, Decoder, Encoder


@dataclass
class LGVQConfig:
    resolution: int = 32
    in_channels: int = 3
    ch: int = 32
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = ()
    z_channels: int = 32
    dropout: float = 0.0
    embed_dim: int = 32
    codebook_size: int = 128
    quantizer: str = "vq"
    commitment_weight: float = 0.25
    legacy: bool = True
    ema_update: bool = False
    decay: float = 0.99
    use_cosine_sim: bool = False
    quantizer_kwargs: dict = field(default_factory=dict)
    text_encoder: str = "minilm"
    use_text_losses: bool = True
    w_gsa: float = 0.1
    w_mtp: float = 0.1
    w_ras: float = 0.1
    mask_input: bool = True
    max_text_len: int = 32
    mask_ratio_range: tuple = (0.1, 0.3)
    vt_layers: int = 2
    vt_heads: int = 1
    vt_mlp_ratio: int = 4
    mtp_layers: int = 2
    mtp_heads: int = 1
    mtp_ffn_hidden: int | None = 256
    mtp_dropout: float = 0.1
    # "official": q/k/v/out and FFN weights of the MTP decoder ~ N(0, d^-1/2) as the official code; "torch": PyTorch's
    mtp_init: str = "official"
    label_smoothing: float = 0.1
    perceptual_weight: float = 1.0
    lpips_path: str | None = None
    disc_start: int = 2000
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    codebook_weight: float = 1.0
    disc_ndf: int = 64
    disc_layers: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        f = self.downsample_factor
        if self.resolution % f:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling factor {f}")
        return (self.resolution // f, self.resolution // f)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "LGVQConfig":
        """Reject values no model can use, naming the field (``ConfigError``); returns ``self``."""
        _validate_sizes(self)
        _validate_weights(self)
        _validate_quantizer(self)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "LGVQConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LGVQConfig keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def _paper(**kw) -> LGVQConfig:
    base = dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                z_channels=256, embed_dim=256, codebook_size=1024, max_text_len=30, vt_layers=2, vt_heads=1,
                mtp_layers=2, mtp_heads=1, mtp_ffn_hidden=None, disc_start=10000, disc_weight=0.8,
                perceptual_weight=1.0, disc_ndf=64, disc_layers=3)
    base.update(kw)
    return LGVQConfig(**base)


def tiny_cpu() -> LGVQConfig:
    """Few-minute CPU run: 32x32 images, f = 4 (8x8 grid), K = 128, D = 32, packaged MiniLM."""
    return LGVQConfig()


def celebahq(quantizer: str = "vq") -> LGVQConfig:
    return _paper(quantizer=quantizer, w_gsa=0.001, w_mtp=0.01, w_ras=0.0001)


def cub(quantizer: str = "vq") -> LGVQConfig:
    return _paper(quantizer=quantizer, w_gsa=0.001, w_mtp=0.001, w_ras=0.001)


def textcaps(quantizer: str = "vq") -> LGVQConfig:
    return _paper(quantizer=quantizer, w_gsa=0.001, w_mtp=0.01, w_ras=0.0001)


def coco(quantizer: str = "cvq") -> LGVQConfig:
    # no COCO config ships officially; the TextCaps weights and the CVQ quantizer (spec §5.2)
    return _paper(quantizer=quantizer, w_gsa=0.001, w_mtp=0.01, w_ras=0.0001)


PRESETS = {
    "tiny-cpu": tiny_cpu,
    "celebahq": celebahq,
    "cub": cub,
    "coco": coco,
    "textcaps": textcaps,
    "textcaps-cvq": lambda: textcaps("cvq"),
    "celebahq-vqgan": lambda: celebahq("vq"),
    "celebahq-cvq": lambda: celebahq("cvq"),
    "cub-vqgan": lambda: cub("vq"),
    "cub-cvq": lambda: cub("cvq"),
    "coco-vqgan": lambda: coco("vq"),
    "coco-cvq": lambda: coco("cvq"),
}


def preset(name: str, **overrides) -> LGVQConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(LGVQConfig)})
    if unknown:
        raise ValueError(f"preset {name!r}: unknown LGVQConfig field(s) {unknown}")
    return replace(PRESETS[name](), **overrides)


_WEIGHTS = ("commitment_weight", "w_gsa", "w_mtp", "w_ras", "perceptual_weight", "disc_weight", "disc_factor",
            "codebook_weight", "label_smoothing", "dropout", "mtp_dropout")


def _validate_sizes(m: LGVQConfig):
    check_ints(m, "model", ("codebook_size", "embed_dim", "resolution", "max_text_len", "ch"), least=1)
    mult = tuple(m.ch_mult) if isinstance(m.ch_mult, (tuple, list)) else ()
    if not mult or not all(is_int(v) and v > 0 for v in mult):
        raise ConfigError(f"model.ch_mult must be one or more positive integers, got {m.ch_mult!r}")
    if any((m.ch * v) % 32 for v in mult):
        raise ConfigError(f"model.ch * model.ch_mult must be multiples of 32 (GroupNorm with 32 groups), got ch={m.ch}, "
                          f"ch_mult={mult}")
    factor = 2 ** (len(m.ch_mult) - 1)
    if m.resolution % factor:
        raise ConfigError(f"model.resolution {m.resolution} is not divisible by 2**(len(ch_mult) - 1) = {factor} "
                          f"(ch_mult {tuple(m.ch_mult)})")


def _validate_weights(m: LGVQConfig):
    check_range(m, "model", _WEIGHTS, 0, 1e4, "a finite number in [0, 1e4]")
    for name in ("label_smoothing", "dropout", "mtp_dropout"):
        if getattr(m, name) >= 1:
            raise ConfigError(f"model.{name} must be below 1, got {getattr(m, name)!r}")
    if not (is_number(m.decay) and 0 <= m.decay < 1):
        raise ConfigError(f"model.decay must be a number in [0, 1), got {m.decay!r}")
    if not (are_numbers(m.mask_ratio_range, 2) and 0.0 <= m.mask_ratio_range[0] <= m.mask_ratio_range[1] <= 1.0):
        raise ConfigError(f"model.mask_ratio_range must be two numbers 0 <= low <= high <= 1, got "
                          f"{m.mask_ratio_range!r}")


def _validate_quantizer(m: LGVQConfig):
    """``quantizer`` and ``quantizer_kwargs``: unknown keys name themselves here instead of in a TypeError at build
    time."""
    import inspect

    check_choice(m, "model", "quantizer", ("vq", "cvq"))
    check_choice(m, "model", "mtp_init", ("official", "torch"))
    if not isinstance(m.quantizer_kwargs, dict):
        raise ConfigError(f"model.quantizer_kwargs must be a dict, got {m.quantizer_kwargs!r}")
    # the arguments _build_quantizer sets from the model config
    taken = {"self", "dim", "codebook_size", "commitment_weight", "channel_last"}
    if m.quantizer == "vq":
        from lgvq_fast.quantize import VectorQuantizer as cls

        taken |= {"legacy", "use_cosine_sim", "ema_update", "decay"}
    else:
        from lgvq_fast.quantize_cvq import CVQVectorQuantizer as cls
    # a changed decay the chosen quantizer would ignore without a word
    if m.decay != LGVQConfig.decay and m.quantizer == "cvq":
        raise ConfigError(f"model.decay={m.decay!r} applies to the 'vq' quantizer only; the CVQ quantizer takes its "
                          f"own in model.quantizer_kwargs (e.g. --set 'model.quantizer_kwargs={{\"decay\": "
                          f"{m.decay!r}}}')")
    if m.decay != LGVQConfig.decay and not m.ema_update:
        raise ConfigError(f"model.decay={m.decay!r} only applies to the EMA codebook; set model.ema_update=true "
                          f"or leave decay at {LGVQConfig.decay}")
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k, p in params.items() if k not in taken and p.kind != p.VAR_KEYWORD)
    unknown = sorted(set(m.quantizer_kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"model.quantizer_kwargs: unknown key(s) {unknown} for quantizer {m.quantizer!r}; "
                          f"allowed: {allowed}")
    kw = m.quantizer_kwargs
    v = kw.get("threshold_ema_dead_code", 0)
    if not (is_number(v) and v >= 0):
        raise ConfigError(f"model.quantizer_kwargs: threshold_ema_dead_code must be a number >= 0 (0: no restart), "
                          f"got {v!r}")
    if not isinstance(kw.get("check_finite", False), bool):
        raise ConfigError(f"model.quantizer_kwargs: check_finite must be true or false, got {kw['check_finite']!r}")


def _build_quantizer(cfg: LGVQConfig) -> nn.Module:
    if cfg.quantizer == "vq":
        from lgvq_fast.quantize import VectorQuantizer

        # decay belongs to the EMA codebook: VectorQuantizer refuses it with ema_update=False
        ema = {"decay": cfg.decay} if cfg.ema_update else {}
        return VectorQuantizer(cfg.embed_dim, cfg.codebook_size, commitment_weight=cfg.commitment_weight,
                               legacy=cfg.legacy, use_cosine_sim=cfg.use_cosine_sim, ema_update=cfg.ema_update,
                               channel_last=True, **ema, **cfg.quantizer_kwargs)
    if cfg.quantizer == "cvq":
        from lgvq_fast.quantize_cvq import CVQVectorQuantizer

        return CVQVectorQuantizer(cfg.embed_dim, cfg.codebook_size, commitment_weight=cfg.commitment_weight,
                                  channel_last=True, **cfg.quantizer_kwargs)
    raise ValueError(f"quantizer must be 'vq' or 'cvq', got {cfg.quantizer!r}")


class LGVQ(nn.Module):
    # Under 16-bit autocast, forward casts the VQGAN convolutions' weights in one batched op
    # (``lgvq_fast.models._precast``); ``compile_model`` turns it off, compiled graphs fuse their own casts.
    precast = True

    def __init__(self, cfg: LGVQConfig, text_embedding: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                        attn_resolutions=tuple(cfg.attn_resolutions), resolution=cfg.resolution,
                        z_channels=cfg.z_channels, dropout=cfg.dropout)
        self.encoder = Encoder(in_channels=cfg.in_channels, **backbone)
        self.decoder = Decoder(out_ch=cfg.in_channels, **backbone)
        self.quant_conv = Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantizer = _build_quantizer(cfg)
        self.sam = None
        self.ram = None
        if cfg.use_text_losses:
            if text_embedding is None or text_embedding.ndim != 2:
                raise ValueError("use_text_losses needs text_embedding [V, C_text] (the text encoder's input "
                                 "embedding table)")
            self._build_text_heads(cfg, text_embedding)

    def _build_text_heads(self, cfg, text_embedding):
        # Drawn from a forked CPU RNG: whatever is built after the model (the discriminator) gets the same
        # initial weights with and without the text heads, so the two arms of an ablation differ only in them.
        with torch.random.fork_rng(devices=[]):
            self.sam = SemanticAlignment(
                embed_dim=cfg.embed_dim, text_embedding=text_embedding, grid=cfg.grid,
                max_text_len=cfg.max_text_len, vt_layers=cfg.vt_layers, vt_heads=cfg.vt_heads,
                vt_mlp_ratio=cfg.vt_mlp_ratio, mtp_layers=cfg.mtp_layers, mtp_heads=cfg.mtp_heads,
                mtp_ffn_hidden=cfg.mtp_ffn_hidden, mtp_dropout=cfg.mtp_dropout,
                label_smoothing=cfg.label_smoothing, mtp_init=cfg.mtp_init)
            self.ram = RelationAlignment(cfg.embed_dim, text_embedding.shape[1])

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def _precast_modules(self):
        """The convolutions whose weights are cast together: all but the last layer, whose own cast keeps the
        adaptive GAN weight's ``autograd.grad`` to it from running through the shared cast."""
        if not self.precast:
            return ()
        cached = self.__dict__.get("_precast_list")
        if cached is None:
            cached = tuple(m for m in self.modules() if isinstance(m, Conv2d) and m is not self.decoder.conv_out)
            self.__dict__["_precast_list"] = cached
        return cached

    def _quantize(self, images):
        dev = images.device
        with nvtx_range("encoder", dev):
            z = self.quant_conv(self.encoder(images))
        with nvtx_range("quantizer", dev):
            # channel-last [B, h, w, D]: the layout f_vt and RAM read as tokens
            quant, indices, q_loss = self.quantizer(z.permute(0, 2, 3, 1))
        return quant, indices, q_loss

    def _check_images(self, images):
        """[B, in_channels, H, W] floating images, H and W divisible by the downsampling factor, in the weights'
        dtype unless autocast is on: ValueError naming what is wrong (not an error from deep inside a conv)."""
        c = self.cfg.in_channels
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != c:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [B, {c}, H, W], got {got}")
        f = self.cfg.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images of {images.shape[2]}x{images.shape[3]} pixels: height and width must be "
                             f"divisible by the downsampling factor {f} (len(ch_mult) = {len(self.cfg.ch_mult)})")
        dtype = self.encoder.conv_in.weight.dtype
        if not images.is_floating_point() or (images.dtype != dtype
                                              and not torch.is_autocast_enabled(images.device.type)):
            raise ValueError(f"images must be {str(dtype).replace('torch.', '')} like the model's weights (or run "
                             f"under torch.autocast), got {str(images.dtype).replace('torch.', '')}")

    def encode(self, images):
        """images [B, 3, H, W] → (quant [B, D, h, w], indices [B, h, w])."""
        self._check_images(images)
        quant, indices, _ = self._quantize(images)
        return quant.permute(0, 3, 1, 2), indices

    def decode(self, quant):
        with nvtx_range("decoder", quant.device):
            return self.decoder(self.post_quant_conv(quant))

    def decode_indices(self, indices):
        """indices [B, h, w] (as ``encode`` returns them) → images [B, 3, H, W]."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 3:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"decode_indices: indices must be [B, h, w] code indices, got {got}")
        codes = self.quantizer.get_codes_from_indices(indices)  # [B, h, w, D]
        return self.decode(codes.permute(0, 3, 1, 2).to(self.post_quant_conv.weight.dtype))

    def forward(self, images, text=None, text_feats=None):
        self._check_images(images)
        with precast_weights(self._precast_modules(), images.device.type):
            return self._forward(images, text, text_feats)

    def _forward(self, images, text, text_feats):
        quant, indices, q_loss = self._quantize(images)
        x_rec = self.decode(quant.permute(0, 3, 1, 2))
        out = {"x_rec": x_rec, "indices": indices, "q_loss": q_loss, "text_losses": {},
               "mtp_acc": None, "vt_global": None}
        if self.sam is None:
            return out
        b, h, w, d = quant.shape
        tokens = quant.reshape(b, h * w, d)
        with nvtx_range("text_losses", images.device):
            vt_out = self.sam.visual(tokens, (h, w))  # [B, T + 1, C_text]
            out["vt_global"] = vt_out[:, 0]
            if text is not None:
                out["text_losses"], out["mtp_acc"] = self._text_losses(vt_out, tokens, text, text_feats)
        return out

    @torch.no_grad()
    def predict_masked(self, images, text, text_feats):
        """The MTP head's most likely token id at each masked position of ``text`` ([B, L], -1 elsewhere), from the
        images' codes and ``text_feats`` (``text_encoder.encode(text, cfg.mask_input)``)."""
        if self.sam is None:
            raise ValueError("predict_masked needs the text heads (use_text_losses=True)")
        quant, _, _ = self._quantize(images)
        b, h, w, d = quant.shape
        vt_out = self.sam.visual(quant.reshape(b, h * w, d), (h, w))
        text = text.to(vt_out.device)
        return self.sam.predict_masked(vt_out, text_feats[0].to(vt_out.device), text)

    def _text_losses(self, vt_out, tokens, text, text_feats):
        if text_feats is None:
            raise ValueError("text_feats is required with text: pass text_encoder.encode(text, cfg.mask_input)")
        if not hasattr(text, "input_ids") or not hasattr(text, "to"):
            raise TypeError(f"text must be a TextBatch (TextEncoder.tokenize(captions)), got {type(text).__name__}")
        token_feats, global_feat = text_feats[0], text_feats[1]
        token_feats_full = getattr(text_feats, "token_feats_full", token_feats)
        width = self.sam.c_text
        for name, t in (("token features", token_feats), ("global feature", global_feat),
                        ("full token features", token_feats_full)):
            if t.shape[-1] != width:
                raise ValueError(f"text_feats: {name} have width {t.shape[-1]}, the model was built for the text "
                                 f"encoder's width {width} (same encoder as at build time?)")
        dev = vt_out.device
        text = text.to(dev)
        token_feats, global_feat, token_feats_full = (t.to(dev) for t in (token_feats, global_feat, token_feats_full))
        if token_feats.shape[:2] != text.input_ids.shape or global_feat.shape[0] != text.input_ids.shape[0]:
            raise ValueError(f"text_feats shapes {tuple(token_feats.shape)}, {tuple(global_feat.shape)} do not match "
                             f"text.input_ids {tuple(text.input_ids.shape)}")
        if global_feat.shape[0] != vt_out.shape[0]:
            raise ValueError(f"text batch {global_feat.shape[0]} != image batch {vt_out.shape[0]}")
        losses = {"gsa": gsa_loss(vt_out[:, 0], global_feat)}
        losses["mtp"], acc = self.sam.mtp(vt_out, token_feats, text)
        losses["ras"] = self.ram(token_feats_full, vt_out[:, 1:], tokens, text.pad_mask)
        return losses, acc


def build_model(cfg: LGVQConfig, text_encoder=None):
    """→ (LGVQ, VQGANLoss). ``text_encoder`` (a ``TextEncoder``) is required when ``cfg.use_text_losses``."""
    from lgvq_fast.models.losses import VQGANLoss

    emb = None
    if cfg.use_text_losses:
        if text_encoder is None:
            raise ValueError("build_model: cfg.use_text_losses needs a text_encoder")
        emb = text_encoder.input_embeddings
    model = LGVQ(cfg, emb)
    loss = VQGANLoss(disc_start=cfg.disc_start, disc_weight=cfg.disc_weight, disc_factor=cfg.disc_factor,
                     codebook_weight=cfg.codebook_weight, perceptual_weight=cfg.perceptual_weight,
                     lpips_path=cfg.lpips_path, w_gsa=cfg.w_gsa, w_mtp=cfg.w_mtp, w_ras=cfg.w_ras,
                     disc_in_channels=cfg.in_channels, disc_ndf=cfg.disc_ndf, disc_layers=cfg.disc_layers)
    return model, loss
