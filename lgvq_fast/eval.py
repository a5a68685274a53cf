"""Evaluate an LG-VQ tokenizer: ``python -m lgvq_fast.eval --ckpt runs/tiny-cpu/checkpoints/step_0000300.pt``.

Metrics (``evaluate``): PSNR and SSIM of reconstructions, codebook usage (fraction of codes used) and
perplexity, masked-word accuracy with k masked words per caption (the MTP head predicts them from the image
codes and the rest of the caption), caption<->image retrieval R@1 between the global vision token and the text
encoder's global feature over the whole evaluated set, and FID when a local Inception checkpoint is given.
"""
import argparse
import json
import math
import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script (python lgvq_fast/eval.py): Python put this file's folder first on sys.path, where the package's
    # own modules (data, models, ops) would shadow top-level modules of those names. Drop it: the package is
    # imported as installed (pip install -e .), and the repository root is never added.
    del sys.path[0]

import torch

from lgvq_fast.errors import EvalError, NonFiniteMetrics, one_line_error, run_cli


def mask_k_words(text, k, generator):
    """A copy of ``text`` whose mlm_mask marks exactly min(k, body length) random body tokens per caption."""
    ids = text.input_ids
    # the first real token and the last one are the start / end specials (BERT [CLS]/[SEP], CLIP SOT/EOT)
    special = torch.zeros_like(text.pad_mask)
    special[:, 0] = True
    last = text.pad_mask.long().sum(1) - 1
    special[torch.arange(ids.shape[0]), last.clamp_min(0)] = True
    body = text.pad_mask & ~special
    score = torch.rand(ids.shape, generator=generator).masked_fill(~body, 2.0)
    order = score.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ids.shape[1]).expand_as(order).contiguous())
    mlm = (rank < k) & body
    return type(text)(input_ids=ids, pad_mask=text.pad_mask, mlm_mask=mlm, mask_ratio=float("nan"))


class FID:
    """FID from a local Inception checkpoint only (no download).

    ``path`` is a TorchScript Inception feature extractor (e.g. the pt_inception-2015-12-05 export used by
    clean-fid / StyleGAN): images uint8 [B, 3, H, W] in, features [B, F] out. Anything else raises.
    """

    def __init__(self, path, device):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"Inception checkpoint not found: {path!r}")
        try:
            net = torch.jit.load(path, map_location=device).eval()
        except Exception as exc:
            raise ValueError(
                f"cannot load {path} as a TorchScript Inception feature extractor ({exc}). torchmetrics' own "
                "FID needs the torch-fidelity package and downloads its weights unless "
                "feature_extractor_weights_path is given; this project never downloads, so pass a local "
                "TorchScript export instead") from exc
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=_UInt8Features(net), normalize=False).to(device)

    def update(self, x, real):
        self.metric.update(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), real=real)

    def compute(self):
        return float(self.metric.compute())


class _UInt8Features(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten(1)


@torch.no_grad()
def evaluate(model, loader, text_encoder=None, max_batches=None, mask_words=(1, 3), inception_path=None,
             device=None, seed=0, progress=False, fid=None):
    """Metrics over ``loader`` (collate batches of ``make_collate``) → dict of floats (None when unavailable).

    ``progress`` shows a tqdm bar over the batches; ``fid`` is a fresh ``FID`` to use instead of loading
    ``inception_path``. Raises ``ValueError`` when the loader yields no image."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    k_codes = model.cfg.codebook_size
    counts = torch.zeros(k_codes, dtype=torch.long, device=device)
    psnr_sum, ssim_sum, n_img = 0.0, 0.0, 0
    vt, tg, caps = [], [], []
    hits = {k: [0.0, 0] for k in mask_words}
    gen = torch.Generator().manual_seed(seed)
    if fid is None and inception_path:
        fid = FID(inception_path, device)
    has_heads = getattr(model, "sam", None) is not None
    batches = loader
    if progress:
        from tqdm import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        if max_batches is not None and total is not None:
            total = min(total, max_batches)
        batches = tqdm(loader, total=total, desc="eval", unit="batch", dynamic_ncols=True)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch["image"].to(device)
        out = model(x)
        x_rec = out["x_rec"].float().clamp(-1, 1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1)
        psnr_sum += float((-10 * torch.log10(mse.clamp_min(1e-10))).sum())
        ssim_sum += float(ssim_fn((x_rec + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="sum"))
        n_img += x.shape[0]
        counts += torch.bincount(out["indices"].flatten(), minlength=k_codes)
        if fid is not None:
            fid.update(x, real=True)
            fid.update(x_rec, real=False)
        if text_encoder is None or not has_heads:
            continue
        text = batch.get("text")
        if text is None:
            text = text_encoder.tokenize(batch["captions"], model.cfg.max_text_len, generator=gen)
        feats = text_encoder.encode(text.to(device), mask_input=model.cfg.mask_input)
        vt.append(out["vt_global"].float().cpu())
        tg.append(feats[1].float().cpu())
        caps.extend(batch["captions"])
        for k in mask_words:
            tk = mask_k_words(text.to("cpu"), k, gen).to(device)
            n_masked = int(tk.mlm_mask.sum())
            if n_masked == 0:
                continue
            o = model(x, tk, text_encoder.encode(tk, mask_input=model.cfg.mask_input))
            hits[k][0] += float(o["mtp_acc"]) * n_masked
            hits[k][1] += n_masked
    model.train(was_training)
    if progress:
        batches.close()
    if n_img == 0:
        raise ValueError("evaluate: the loader yielded no images (empty dataset, or max_batches=0)")
    p = counts.float() / counts.sum().clamp_min(1)
    result = {
        "images": n_img,
        "psnr": psnr_sum / max(n_img, 1),
        "ssim": ssim_sum / max(n_img, 1),
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
        "fid": fid.compute() if fid is not None else None,
    }
    for k in mask_words:
        result[f"masked_word_acc@{k}"] = hits[k][0] / hits[k][1] if hits[k][1] else None
    result.update(retrieval_r1(vt, tg, caps))
    return result


def retrieval_r1(vt, tg, captions):
    """Image→caption and caption→image R@1 by cosine similarity; a hit is any item with the same caption."""
    if not vt:
        return {"r1_image_to_text": None, "r1_text_to_image": None, "r1_chance": None}
    v = torch.nn.functional.normalize(torch.cat(vt), dim=1, eps=1e-8)
    t = torch.nn.functional.normalize(torch.cat(tg), dim=1, eps=1e-8)
    sim = v @ t.T
    ids = {c: j for j, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = cid[:, None] == cid[None, :]
    i2t = same[torch.arange(len(cid)), sim.argmax(1)].float().mean()
    t2i = same[sim.argmax(0), torch.arange(len(cid))].float().mean()
    chance = same.float().mean()
    return {"r1_image_to_text": float(i2t), "r1_text_to_image": float(t2i), "r1_chance": float(chance)}


def _read_checkpoint(path):
    """The state dict of a training checkpoint; EvalError naming ``path`` when it cannot be read or is not one."""
    from lgvq_fast.training.checkpoint import CheckpointIO

    try:
        state = CheckpointIO.load(path, "cpu")
    except FileNotFoundError:
        raise
    except ValueError as exc:  # "cannot read checkpoint <path>: ..." (unreadable, or not a training checkpoint)
        raise EvalError(one_line_error(exc)) from exc
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(cfg, dict) \
            or not all(isinstance(cfg.get(k), dict) for k in ("model", "data", "train")):
        raise EvalError(f"cannot read checkpoint {path}: not a lgvq_fast training checkpoint (it needs the 'model' "
                        "weights and the 'config' with its model, data and train sections that train.py writes)")
    return state


def _first_mismatch(model_sd, ckpt_sd):
    """(description of the first mismatching key in the model's order, number of mismatching keys)."""
    found = []
    for k, v in model_sd.items():
        if k not in ckpt_sd:
            found.append(f"{k} is missing from the checkpoint")
        elif tuple(ckpt_sd[k].shape) != tuple(v.shape):
            found.append(f"{k} has shape {list(ckpt_sd[k].shape)} in the checkpoint, {list(v.shape)} in the model")
    found += [f"{k} is in the checkpoint but not in the model" for k in ckpt_sd if k not in model_sd]
    return (found[0] if found else None), len(found)


def load_checkpoint_model(path, device, text_encoder_name=None):
    """(model, text_encoder, config dict) from a training checkpoint.

    Raises ``EvalError`` (one line, naming ``path``) when the file cannot be read or its weights do not fit the
    model built from its config with the chosen text encoder."""
    from lgvq_fast.models import LGVQ, LGVQConfig, TextEncoder

    state = _read_checkpoint(path)
    cfg = state["config"]
    try:
        mcfg = LGVQConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as exc:
        raise EvalError(f"checkpoint {path}: its model config cannot be used: {one_line_error(exc)}") from exc
    saved_encoder = mcfg.text_encoder
    if text_encoder_name:
        mcfg.text_encoder = text_encoder_name
    text_encoder = TextEncoder.build(mcfg.text_encoder, max_len=mcfg.max_text_len)
    # the model alone: evaluation needs no loss module (discriminator, perceptual net)
    model = LGVQ(mcfg, text_encoder.input_embeddings if mcfg.use_text_losses else None)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first, n = _first_mismatch(model.state_dict(), state["model"])
        why = f"{first}; {n} mismatching key(s) in all" if first else one_line_error(exc)
        enc = f"text encoder {mcfg.text_encoder!r}"
        if mcfg.text_encoder != saved_encoder:
            enc += f" (--text-encoder; the checkpoint was trained with {saved_encoder!r})"
        raise EvalError(f"checkpoint {path}: its weights do not fit the model built from its config with {enc}: "
                        f"{why}") from exc
    return model.to(device).eval(), text_encoder.to(device), cfg


def _check_device(name):
    """torch.device(name), or EvalError when it is malformed or not available on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise EvalError(f"--device {name!r}: {one_line_error(exc)}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "PyTorch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise EvalError(f"--device {name}: CUDA is not available on this machine ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _prepare_out(path):
    """Create the folder of ``--out`` up front, so a bad path fails before the evaluation runs."""
    if os.path.isdir(path):
        raise EvalError(f"--out {path} is a directory; give a file name, e.g. {os.path.join(path, 'metrics.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"--out {path}: cannot create its folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise EvalError(f"--out {path}: its folder {folder} is not writable")


def _write_json(result, path):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except OSError as exc:
        raise EvalError(f"--out {path}: cannot write the metrics: {exc.strerror or exc}") from exc


class _ReadErrors(torch.utils.data.Dataset):
    """A folder dataset whose read errors (unreadable image, ...) become one-line EvalErrors with a hint."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        try:
            return self.ds[index]
        except (OSError, ValueError) as exc:
            hint = "" if self.ds.skip_bad_samples else " (pass --skip-bad-samples to skip unreadable samples)"
            raise EvalError(f"{one_line_error(exc)}{hint}") from exc


class _CountSkipped:
    """Iterates ``loader`` and adds up the samples its batches report as skipped (``batch["skipped"]``)."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.skipped += int(batch.get("skipped", 0))
            yield batch


def main(argv=None):
    from lgvq_fast.data import build_dataset, make_collate

    p = argparse.ArgumentParser(prog="eval.py", description="Evaluate an LG-VQ checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="which split of the checkpoint's dataset (CUB: val and test are its test split)")
    p.add_argument("--data-root")
    p.add_argument("--image-dir")
    p.add_argument("--annotations")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--inception", help="local TorchScript Inception feature extractor for FID")
    p.add_argument("--text-encoder")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip missing or unreadable images and empty caption files (counted and printed) even "
                        "when the checkpoint was trained without data.skip_bad_samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the metrics JSON here (its folder is created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        p.error("--batch-size and --max-batches must be positive")
    # everything that can be checked without the model first, so that a bad option fails in seconds
    device = _check_device(args.device)
    if args.out:
        _prepare_out(args.out)
    fid = None
    if args.inception:
        try:
            fid = FID(args.inception, device)
        except ValueError as exc:
            raise EvalError(f"--inception: {one_line_error(exc)}") from exc
    model, text_encoder, cfg = load_checkpoint_model(args.ckpt, device, args.text_encoder)
    d = cfg["data"]
    skip = bool(args.skip_bad_samples or d.get("skip_bad_samples", False))
    try:
        ds = build_dataset(d["name"], args.split, cfg["model"]["resolution"], seed=cfg["train"]["seed"],
                           root=args.data_root or d.get("root"), size=d.get("val_size"),
                           image_dir=args.image_dir or d.get("val_image_dir") or d.get("image_dir"),
                           annotation_json=args.annotations or d.get("val_annotations") or d.get("annotations"),
                           max_words=d.get("max_words", 27), skip_bad_samples=skip)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        hint = "" if skip else " (--skip-bad-samples skips missing files and empty caption files)"
        raise EvalError(f"{one_line_error(exc)}{hint}") from exc
    if hasattr(ds, "skip_bad_samples"):
        ds = _ReadErrors(ds)
    collate = make_collate(text_encoder, cfg["model"]["max_text_len"], seed=cfg["train"]["seed"])
    loader = _CountSkipped(torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                                       collate_fn=collate))
    result = evaluate(model, loader, text_encoder, max_batches=args.max_batches, fid=fid, device=device,
                      progress=not args.no_progress)
    if skip:
        at_build = int(getattr(getattr(ds, "ds", ds), "skipped", 0))
        result["skipped_samples"] = at_build + loader.skipped
        print(f"skipped bad samples: {at_build} at build time, {loader.skipped} unreadable image(s) while reading",
              file=sys.stderr, flush=True)
    result, nonfinite = finite_json(result)
    print(json.dumps(result, indent=2, allow_nan=False))
    if args.out:
        _write_json(result, args.out)
    if nonfinite:
        raise NonFiniteMetrics(f"the model's metrics are not finite ({', '.join(nonfinite)}; null in the JSON): "
                               f"{args.ckpt} gives NaN or inf outputs")
    return result


def finite_json(result, prefix=""):
    """(``result`` with every NaN or inf float replaced by None, the names of those entries): JSON has no NaN,
    and ``json.dump`` would write the invalid token ``NaN``."""
    if isinstance(result, dict):
        out, bad = {}, []
        for k, v in result.items():
            out[k], sub = finite_json(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
            bad += sub
        return out, bad
    if isinstance(result, (list, tuple)):
        pairs = [finite_json(v, f"{prefix}[{i}]") for i, v in enumerate(result)]
        return [v for v, _ in pairs], [b for _, sub in pairs for b in sub]
    if isinstance(result, float) and not math.isfinite(result):
        return None, [prefix]
    return result, []


def cli(argv=None):
    """``main`` for the command line: a user error (missing or unreadable checkpoint, data or model file, weights
    that do not fit the model, bad --device / --out / --inception) is one ``eval.py: error:`` line, exit status 2;
    a model whose metrics are NaN or inf gets null for them in the JSON and exit status 3."""
    return run_cli(main, "eval.py", argv)


if __name__ == "__main__":
    cli()
