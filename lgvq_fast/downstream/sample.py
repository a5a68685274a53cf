"""Sample a trained downstream model into a PNG grid.

t2i checkpoints:      python -m lgvq_fast.downstream.sample --ckpt CKPT --caption "a large red circle" [--n 4]
caption checkpoints:  python -m lgvq_fast.downstream.sample --ckpt CKPT [--image FILE ...] [--n 8]

The tokenizer is the one the checkpoint records (``--tokenizer`` to point at a moved file; it must be the same
weights). t2i: one column per sample, its caption above; caption: each image (``--image`` files, else the first
``--n`` validation images of the run's code cache) with the generated caption under it.
"""
import argparse
import os

import torch

from lgvq_fast.errors import run_cli


def make_parser():
    p = argparse.ArgumentParser(prog="python -m lgvq_fast.downstream.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint lgvq_fast/downstream/train.py wrote")
    p.add_argument("--tokenizer", help="the tokenizer checkpoint (default: the path the checkpoint records)")
    p.add_argument("--caption", action="append", default=[], help="t2i: a prompt (repeat for several)")
    p.add_argument("--image", action="append", default=[], help="caption: an image file (repeat for several)")
    p.add_argument("--n", type=int, default=None, help="t2i: samples per caption (default 4); caption: validation "
                                                       "images when no --image is given (default 8)")
    p.add_argument("--out", default=None, help="PNG path (default <run folder>/samples/sample.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (caption's default; t2i samples)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="default: the run's train.top_p")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (t2i)")
    p.add_argument("--device", default="auto")
    return p


def _load_images(paths, resolution):
    from PIL import Image

    from lgvq_fast.data.shapes import pil_to_tensor

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {path}: no such file")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as exc:
            raise ValueError(f"--image {path}: cannot read it as an image ({exc})") from exc
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        out.append(pil_to_tensor(img))
    return torch.stack(out)


def main(argv=None):
    from lgvq_fast.downstream.state import check_same_tokenizer, load_downstream, load_tokenizer, text_vocab

    args = make_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, state = load_downstream(args.ckpt, device)
    task = state["config"]["train"]["task"]
    saved = state["tokenizer"]
    tok_path = args.tokenizer or saved.get("path")
    if not tok_path or not os.path.isfile(tok_path):
        raise FileNotFoundError(f"the tokenizer {tok_path} that {args.ckpt} was trained over is not there: pass its "
                                "new place with --tokenizer")
    tokenizer, text_encoder, tok_cfg, identity = load_tokenizer(tok_path, device)
    check_same_tokenizer(saved, identity, args.ckpt)
    vocab = text_vocab(state["caption_vocabulary"], text_encoder)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), "samples",
                                   "sample.png")
    g = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(greedy=args.greedy, top_k=args.top_k, temperature=args.temperature, generator=g,
                    top_p=args.top_p if args.top_p is not None else state["config"]["train"].get("top_p"))
    if task == "t2i":
        path = _sample_t2i(args, model, state, tokenizer, text_encoder, vocab, sampling, out)
    else:
        path = _sample_caption(args, model, state, tokenizer, text_encoder, vocab, tok_cfg, out, device)
    print(f"wrote {path}")
    return path


def _sample_t2i(args, model, state, tokenizer, text_encoder, vocab, sampling, out):
    from lgvq_fast.downstream.evaluate import decode
    from lgvq_fast.downstream.state import check_captions
    from lgvq_fast.downstream.tasks import generate_codes
    from lgvq_fast.images import save_captioned_grid

    if args.image:
        raise ValueError(f"{args.ckpt} is a t2i model (caption -> image): give --caption, not --image")
    n = 4 if args.n is None else args.n
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    text = check_captions(args.caption, text_encoder, state["caption_vocabulary"], model.cfg.max_text_tokens)
    text = text.apply(lambda x: x.repeat_interleave(n, 0))
    codes = generate_codes(model, text, tuple(state["tokenizer"]["grid"]), vocab=vocab, cfg_scale=args.cfg_scale,
                           **sampling)
    images = decode(tokenizer, codes)
    captions = [c for c in args.caption for _ in range(n)]
    return save_captioned_grid(images, None, captions, path=out)


def _sample_caption(args, model, state, tokenizer, text_encoder, vocab, tok_cfg, out, device):
    from lgvq_fast.downstream.evaluate import _batches, decode
    from lgvq_fast.downstream.tasks import generate_captions
    from lgvq_fast.images import save_captioned_grid

    if args.caption:
        raise ValueError(f"{args.ckpt} is a caption model (image -> caption): give --image files (or none for "
                         "validation images), not --caption")
    if args.image:
        images = _load_images(args.image, int(tok_cfg["model"]["resolution"]))
        with torch.no_grad():
            _, codes = tokenizer.encode(images.to(device))
        names = [os.path.basename(p) for p in args.image]
    else:
        from lgvq_fast.downstream.codes import CodeCache
        from lgvq_fast.downstream.config import DownstreamConfig

        cfg = DownstreamConfig.from_dict(state["config"])
        cache = CodeCache.get(cfg.data.cache_dir, args.tokenizer or state["tokenizer"]["path"], cfg.data.spec("val"),
                              "val", device)
        n = min(8 if args.n is None else args.n, cache.n)
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        _, codes, _ = next(_batches(cache, n, n))
        images = decode(tokenizer, codes)
        names = [f"validation image {i}" for i in range(n)]
    # greedy unless a sampling filter is asked for
    greedy = args.greedy or (args.top_k is None and args.top_p is None)
    captions = generate_captions(model, codes.to(device), text_encoder, vocab=vocab, greedy=greedy, top_k=args.top_k,
                                 top_p=args.top_p, temperature=args.temperature)
    return save_captioned_grid(images, None, names, notes=captions, path=out)


def cli(argv=None):
    return run_cli(main, "downstream/sample.py", argv)


if __name__ == "__main__":
    cli()
