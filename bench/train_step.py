"""Images/s and peak memory of a full LG-VQ training step (generator + discriminator, GAN active).

    python bench/train_step.py              # GPU: paper shape; CPU: the tiny-cpu preset
    python bench/train_step.py --channels-last
    python bench/train_step.py --compile --channels-last
    python bench/train_step.py --skip-reference --compile blocks --channels-last

GPU: batch 8, 256x256, K=1024, D=256, text length 30, a randomly initialised CLIP ViT-B/32-shaped text tower
(same FLOPs as the real one, no weights needed) and a randomly initialised VGG16 perceptual net.
"ours" is ``lgvq_fast.training.step.TrainStep`` with the trainer's optimisers (``make_optimizers``: fused Adam on
CUDA): bf16 autocast, one generator forward per step, D trained on the detached reconstruction, run eagerly;
``--cuda-graph`` adds it captured in a CUDA graph, as the trainer runs it by default on one GPU
(``train.cuda_graph=auto``; with ``--channels-last``, the layout the trainer then picks). "reference"
follows the official structure in the same process with plain Adam: fp32, and the discriminator pass
re-encodes the text and recomputes the whole generator forward and its reconstruction losses before the D
loss (spec §5.4, B8); it uses this package's fused ops, so its ratio isolates the step structure, precision
and optimiser. "official-style" is the same two-pass fp32 step with the official op formulations
as well: PyTorch nearest-code search and codebook update (the reference path), the RAS loss as a Python loop
over word positions, PyTorch's GroupNorm, swish as ``x * sigmoid(x)`` and LPIPS as PyTorch ops. All variants share one model, so
their outputs agree (checked in tests). ``--channels-last`` puts "ours" (model, discriminator, input) in
channels_last, where the VQGAN's GroupNorm + swish run as the fused Triton op; the model is then converted back
and the reference arms run NCHW, as the official code. ``--norm-impl`` picks that norm for "ours". Every variant runs under the same backend flags (cuDNN autotuning on, TF32 allowed for fp32
convolutions and matrix products: the fastest fp32 setting for the two-pass arms).

``--profile DIR`` also writes DIR/train_step/<card>_profile.txt: the torch.profiler table of three "ours" steps.
"""
import argparse
import contextlib
import os

import torch

# python bench/<name>.py puts bench/ first on sys.path: _common is this folder's shared helpers
from _common import (card_slug, device_name, extra_memory_bytes, fmt_bytes, print_table, time_ms,
                     write_results)


class _VocabOnlyTokenizer:
    """Lets TextEncoder wrap a random tower without tokenizer files; the bench feeds token ids directly."""

    def __init__(self, vocab_size, pad_id=0, eos_id=None):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, pad_id, eos_id
        self.mask_token_id, self.sep_token_id = None, eos_id

    def __len__(self):
        return self.vocab_size


def random_clip_text_encoder(max_len):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lgvq_fast.models import TextEncoder

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, projection_dim=512)
    model = CLIPTextModelWithProjection(cfg)
    return TextEncoder(model, _VocabOnlyTokenizer(49408, 0, 49407), kind="clip", max_len=max_len)


def random_text_batch(batch, length, vocab, eos, generator):
    from lgvq_fast.models import TextBatch

    lengths = torch.randint(8, length + 1, (batch,), generator=generator)
    pos = torch.arange(length)[None]
    pad_mask = pos < lengths[:, None]
    ids = torch.randint(1, min(vocab, 40000), (batch, length), generator=generator).masked_fill(~pad_mask, 0)
    ids[torch.arange(batch), lengths - 1] = eos
    body = pad_mask & (pos > 0) & (pos < (lengths - 1)[:, None])
    mlm = body & (torch.rand(batch, length, generator=generator) < 0.25)
    mlm[:, 1] = True
    return TextBatch(input_ids=ids, pad_mask=pad_mask, mlm_mask=mlm, mask_ratio=0.25)


def setup(device, args):
    from lgvq_fast.models import PerceptualLoss, TextEncoder, build_model, preset
    from lgvq_fast.models.vqgan import set_norm_impl
    from lgvq_fast.training.step import make_optimizers, place_models

    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        cfg = preset("cub", disc_start=0, max_text_len=30)
        text_encoder = random_clip_text_encoder(cfg.max_text_len)
        batch, eos = 8, 49407
    else:
        cfg = preset("tiny-cpu", disc_start=0, max_text_len=16)
        text_encoder = TextEncoder.build("minilm", max_len=cfg.max_text_len)
        batch, eos = 8, text_encoder.eos_token_id
    torch.manual_seed(0)
    model, loss_mod = build_model(cfg, text_encoder)
    if device.type == "cuda" or args.perceptual:
        # random VGG16 weights: the perceptual term's FLOPs without needing the LPIPS checkpoint
        loss_mod.perceptual, loss_mod.perceptual_weight = PerceptualLoss(), 1.0
    set_norm_impl(model, getattr(args, "norm_impl", "auto"))
    model.precast = not getattr(args, "no_precast", False)
    channels_last = getattr(args, "channels_last", False)
    place_models(device, channels_last, text_encoder, model, loss_mod)
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, generator=gen).mul_(2).sub_(1).to(device)
    # what the trainer feeds a channels_last model
    x_ours = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    text = random_text_batch(batch, cfg.max_text_len, text_encoder.vocab_size, eos, gen)
    # "ours" uses the trainer's optimizers (fused Adam on CUDA); the official arms the default Adam they ship with
    ours_opt_g, ours_opt_d = make_optimizers(model, loss_mod, 1e-5, (0.5, 0.9), device)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_mod.discriminator.parameters(), lr=1e-5, betas=(0.5, 0.9))
    return dict(cfg=cfg, text_encoder=text_encoder, model=model, loss_mod=loss_mod, x=x, x_ours=x_ours, text=text,
                opt_g=opt_g, opt_d=opt_d, ours_opt_g=ours_opt_g, ours_opt_d=ours_opt_d, batch=batch)


def ours_step(s, device, compiled):
    from lgvq_fast.training.step import TrainStep, make_autocast

    step_fn = TrainStep(compiled, s["loss_mod"], s["ours_opt_g"], s["ours_opt_d"], s["text_encoder"],
                        make_autocast(device, "bf16", cuda_graph=False), s["cfg"], raw_model=s["model"])

    def fn():
        step_fn(s["x_ours"], s["text"], 10**9)

    return fn


def ours_graph_step(s, device, warmup=3):
    """"ours" with the step captured in a CUDA graph (``train.cuda_graph``): the trainer's GraphedTrainStep with
    capturable fused Adam, autocast without its cast cache (the eager arm keeps the cache: any cost of the extra
    casts counts against the graph), the text batch pinned and in its fixed-size form, as the trainer feeds it.
    Warms up and captures before returning ``(fn, graph_bytes)``: the memory the capture reserved (the graph's
    private pool, which keeps the step's activations; the optimizer state, created in the warm-up, is left out
    as in the eager arm's figure)."""
    from lgvq_fast.training.cuda_graph import GraphedTrainStep
    from lgvq_fast.training.step import TrainStep, make_autocast, make_optimizers

    opt_g, opt_d = make_optimizers(s["model"], s["loss_mod"], 1e-5, (0.5, 0.9), device, capturable=True)
    step_fn = TrainStep(s["model"], s["loss_mod"], opt_g, opt_d, s["text_encoder"],
                        make_autocast(device, "bf16", cuda_graph=True), s["cfg"])
    graphed = GraphedTrainStep(step_fn, warmup=warmup)
    text = s["text"].pin_memory().fixed_size()

    def fn():
        graphed(s["x_ours"], text, 10**9)

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    fn()  # capture, then the first replay
    torch.cuda.synchronize(device)
    assert graphed.captures == 1 and graphed.replays == 1, "the step was not captured"
    return fn, torch.cuda.memory_reserved(device) - reserved


@contextlib.contextmanager
def official_ops(model, loss_mod=None):
    """The official code's op formulations: PyTorch nearest-code search and codebook update (this package's
    reference path), the RAS loss as a Python loop over word positions (bench/relation.py), PyTorch's GroupNorm,
    the two-op swish and (with ``loss_mod``) LPIPS' PyTorch formulation."""
    import lgvq_fast.ops
    from relation import word_loop_loss
    from lgvq_fast.models import vqgan

    quantizer = model.quantizer
    saved = quantizer.impl, lgvq_fast.ops.relation_loss, vqgan.swish
    quantizer.impl, lgvq_fast.ops.relation_loss = "reference", word_loop_loss
    vqgan.swish = _two_op_swish
    norms = vqgan.set_norm_impl(model, "native")
    perceptual = getattr(loss_mod, "perceptual", None) if loss_mod is not None else None
    saved_lpips = perceptual.impl if perceptual is not None else None
    if perceptual is not None:
        perceptual.impl = "native"
    try:
        yield
    finally:
        quantizer.impl, lgvq_fast.ops.relation_loss, vqgan.swish = saved
        vqgan.restore_norm_impl(norms)
        if perceptual is not None:
            perceptual.impl = saved_lpips


def _two_op_swish(x):
    """The official swish, ``x * sigmoid(x)`` (two kernels, an extra saved tensor)."""
    return x * torch.sigmoid(x)


def reference_step(s, device, official=False):
    """Official structure: pass 0 = G forward + G update; pass 1 = everything again, then the D update.
    ``official``: also the official op formulations (``official_ops``) instead of this package's fused ops."""
    model, loss_mod, te, cfg = s["model"], s["loss_mod"], s["text_encoder"], s["cfg"]
    step = 10**9

    def fn():
        with official_ops(model, loss_mod) if official else contextlib.nullcontext():
            two_passes()

    def two_passes():
        text = s["text"].to(device)
        feats = te.encode(text, mask_input=cfg.mask_input)
        out = model(s["x"], text, feats)
        g_loss, _ = loss_mod.generator_loss(s["x"], out, step, last_layer=model.last_layer)
        s["opt_g"].zero_grad(set_to_none=True)
        g_loss.backward()
        s["opt_g"].step()
        feats = te.encode(text, mask_input=cfg.mask_input)
        out = model(s["x"], text, feats)
        rec = (s["x"] - out["x_rec"]).abs().mean()
        if loss_mod.perceptual is not None:
            rec = rec + loss_mod.perceptual(s["x"], out["x_rec"]).mean()
        d_loss, _ = loss_mod.discriminator_loss(s["x"], out["x_rec"].detach(), step)
        s["opt_d"].zero_grad(set_to_none=True)
        d_loss.backward()
        s["opt_d"].step()

    return fn


def write_profile(fn, device, out_dir):
    """torch.profiler over three calls of ``fn`` (after one warm-up): the operators by device time, then by CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    avg = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = os.path.join(out_dir, "train_step", f"{card_slug(device)}_profile.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"three 'ours' steps on {device_name(device)}\n")
        f.write(avg.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70) + "\n")
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", nargs="?", const="model", choices=("model", "blocks"), default=None,
                   help="torch.compile 'ours' like the trainer's --compile (whole model, or each VQGAN block)")
    p.add_argument("--channels-last", action="store_true",
                   help="'ours' in channels_last (the reference arms always run NCHW, as the official code)")
    p.add_argument("--norm-impl", choices=("auto", "native", "triton"), default="auto",
                   help="'ours': the VQGAN GroupNorm + swish (train.norm_impl); the official-style arm uses native")
    p.add_argument("--no-precast", action="store_true",
                   help="'ours': leave the convolution weights to autocast's per-call casts (LGVQ.precast off)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time 'ours' captured in a CUDA graph (train.cuda_graph), right after eager 'ours'")
    p.add_argument("--perceptual", action="store_true", help="CPU: add the random-VGG perceptual term too")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--tag", default="", help="results file: bench/results/train_step/<card>[_TAG].json")
    p.add_argument("--profile", metavar="DIR", help="write the profiler table of three 'ours' steps to DIR")
    args = p.parse_args()
    if args.compile == "blocks" and not args.skip_reference:
        p.error("--compile blocks compiles the model all arms share in place: use it with --skip-reference")
    device = torch.device(args.device)
    if args.cuda_graph and (device.type != "cuda" or args.compile):
        p.error("--cuda-graph needs a CUDA device and excludes --compile")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # what the trainer sets on CUDA (train.cudnn_benchmark)
    s = setup(device, args)
    if args.compile:
        from lgvq_fast.training.step import compile_model

        compiled = compile_model(s["model"], args.compile)
    else:
        compiled = s["model"]
    variants = [("ours (1 fwd, bf16)" if device.type == "cuda" else "ours (1 fwd)", ours_step(s, device, compiled))]
    if args.cuda_graph:
        variants.append(("ours (CUDA graph)", "graph"))
    if not args.skip_reference:
        variants.append(("reference (2 fwd, fp32)", reference_step(s, device)))
        variants.append(("official-style (2 fwd, fp32, loop RAS)", reference_step(s, device, official=True)))
    rows = []
    ours_arms = 2 if args.cuda_graph else 1
    for i, (name, fn) in enumerate(variants):
        if i == ours_arms and args.channels_last:
            # the reference arms run in the default layout, as the official code does
            for m in (s["model"], s["loss_mod"]):
                m.to(memory_format=torch.contiguous_format)
        graph_bytes = None
        if fn == "graph":
            try:
                fn, graph_bytes = ours_graph_step(s, device)
            except Exception as exc:  # report it and time the other arms
                print(f"{name}: capture failed: {type(exc).__name__}: {exc}")
                rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                torch.cuda.synchronize(device)
                continue
        ms, q20, q80 = time_ms(fn, device, gpu_rep_ms=3000)  # a step is ~0.1-1 s: at least a few timed steps
        # a captured step's activations live in the graph's pool, reserved at capture: that is its extra memory
        mem = graph_bytes if graph_bytes is not None else extra_memory_bytes(fn, device)
        rows.append({"variant": name, "ms": round(ms, 2), "q20_ms": round(q20, 2), "q80_ms": round(q80, 2),
                     "images_per_s": round(s["batch"] * 1e3 / ms, 2), "peak_extra_mem": fmt_bytes(mem),
                     "peak_extra_bytes": mem})
        if i == 0 and args.profile:
            write_profile(fn, device, args.profile)
    if len(rows) == ours_arms + 2:
        ref_ms, official_ms = rows[-2]["ms"], rows[-1]["ms"]
        for row in rows[:ours_arms]:
            if "ms" in row:
                row["speedup_vs_reference"] = round(ref_ms / row["ms"], 2)
                row["speedup_vs_official_style"] = round(official_ms / row["ms"], 2)
    cfg = s["cfg"]
    shape = {"batch": s["batch"], "resolution": cfg.resolution, "codebook_size": cfg.codebook_size,
             "embed_dim": cfg.embed_dim, "text_len": cfg.max_text_len, "gan_active": True,
             "perceptual": s["loss_mod"].perceptual is not None, "compile": args.compile or False,
             "channels_last": args.channels_last, "norm_impl": args.norm_impl, "precast": not args.no_precast,
             "cuda_graph_arm": args.cuda_graph}
    print(f"train step on {device_name(device)}: {shape}")
    print_table(rows, [("variant", "variant"), ("ms", "ms"), ("images_per_s", "images/s"),
                       ("peak_extra_mem", "peak extra mem"), ("speedup_vs_reference", "vs reference"),
                       ("speedup_vs_official_style", "vs official-style")])
    path = write_results("train_step", device, rows, extra={"shape": shape}, tag=args.tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
