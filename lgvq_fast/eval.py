"""Evaluate an LG-VQ tokenizer: ``python -m lgvq_fast.eval --ckpt runs/tiny-cpu/checkpoints/step_0000300.pt``.

Metrics (``evaluate``): PSNR and SSIM of reconstructions, codebook usage (fraction of codes used) and
perplexity, caption<->image retrieval R@1 between the global vision token and the text encoder's global feature
over the whole evaluated set, FID when a local Inception checkpoint is given, and for models with text heads:

* Masked-word recall, in two protocols. Both mask exactly min(k, n) of a caption's n word tokens (the same
  positions in both) and count a hit when the MTP head's top-1 token is the original one, pooled over all masked
  tokens. ``masked_word_acc@k`` feeds the MTP decoder the text features the model was trained with
  (``model.cfg.mask_input``; by default the caption encoded with the masked tokens replaced by the mask id, so no
  feature has seen a masked word). ``mask{k}_recall_paper`` is the paper's protocol (Table 3, spec §3.3, §8 D4):
  the text encoder sees the *unmasked* caption and the learned mask vectors replace its features at the masked
  positions afterwards (``mask_input=False``); features at the other positions have seen the masked word, which
  the decoder can partly read from them, so only this recall is comparable to Table 3.
* ``code_word_mse``: the code-word relation consistency of Table 4 (``code_word_mse``'s docstring).
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
import torch.nn.functional as F

from lgvq_fast.errors import EvalError, NonFiniteMetrics, one_line_error, run_cli


def word_positions(text):
    """bool [B, L]: the real tokens of each caption other than its first and last (the start / end specials:
    BERT [CLS]/[SEP], CLIP SOT/EOT). Words are the tokenizer's pieces (BPE / WordPiece), punctuation included."""
    special = torch.zeros_like(text.pad_mask)
    special[:, 0] = True
    last = text.pad_mask.long().sum(1) - 1
    special[torch.arange(text.pad_mask.shape[0]), last.clamp_min(0)] = True
    return text.pad_mask & ~special


def mask_k_words(text, k, generator):
    """A copy of ``text`` whose mlm_mask marks exactly min(k, body length) random body tokens per caption."""
    ids = text.input_ids
    body = word_positions(text)
    score = torch.rand(ids.shape, generator=generator).masked_fill(~body, 2.0)
    order = score.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ids.shape[1]).expand_as(order).contiguous())
    mlm = (rank < k) & body
    return type(text)(input_ids=ids, pad_mask=text.pad_mask, mlm_mask=mlm, mask_ratio=float("nan"))


def code_word_mse(token_feats, vision_tokens, codes, word_mask, eps=1e-6):
    """Code-word relation consistency (paper Table 4, Eq. 7-8; matching as the official RAS, spec §4).

    token_feats [B, L, C]: the text encoder's token features of the unmasked caption; vision_tokens [B, T, C]:
    the f_vt outputs of the T grid positions (class token excluded); codes [B, T, D]: the quantized code vectors
    (codebook rows) at those positions; word_mask bool [B, L] (``word_positions``). For caption b with word set
    W_b of n_b words::

        t_i = token_feats[b, i] / |.|;   p_i = argmax_p cos(token_feats[b, i], vision_tokens[b, p])
        c_i = codes[b, p_i] / |.|
        mse_b = 1 / (n_b (n_b - 1)) * sum_{i != j in W_b} (c_i . c_j - t_i . t_j)^2

    Returns ``(mse [B], pairs [B])``, pairs = n_b (n_b - 1); mse_b is 0 where pairs is 0 (fewer than two words).
    ``evaluate`` reports the mean of mse_b over the captions with pairs > 0 (each caption weighs the same).

    Where it departs from the training loss L_ras, and why: (1) only word pairs i != j: the loss averages over all
    L x L entries, SOT/EOT/padding and the diagonal included (spec §8 B7), whose zero error dilutes it by a
    factor that depends on caption length and context size, while the paper describes word-word against code-code
    similarity; (2) the raw code vectors, not the learned projection of RAS (``wrsr_fc``): the paper takes the
    codes from the codebook Z (§8 D7), and a model without text heads (Table 4's VQ-GAN row) has no projection;
    (3) no sign flip by the sign of the max similarity (an artefact of the loss's weighting, §8 B6);
    (4) normalisation with an epsilon (a zero vector gives similarity 0, not NaN). As the loss, the words are the
    encoder's contextual token features (§8 D6), matched over all T positions. Computed in float32 or wider.
    """
    dtype = torch.promote_types(torch.promote_types(token_feats.dtype, codes.dtype), torch.float32)
    dtype = torch.promote_types(dtype, vision_tokens.dtype)
    t = F.normalize(token_feats.to(dtype), dim=-1, eps=eps)
    v = F.normalize(vision_tokens.to(dtype), dim=-1, eps=eps)
    match = (t @ v.transpose(1, 2)).argmax(-1)  # [B, L]
    c = F.normalize(codes.to(dtype), dim=-1, eps=eps)
    c = c.gather(1, match.unsqueeze(-1).expand(-1, -1, c.shape[-1]))  # [B, L, D]
    err = (c @ c.transpose(1, 2) - t @ t.transpose(1, 2)).square()  # [B, L, L]
    w = word_mask.to(err.device)
    pair = w.unsqueeze(2) & w.unsqueeze(1)
    pair &= ~torch.eye(w.shape[1], dtype=torch.bool, device=w.device)
    pairs = pair.flatten(1).sum(1)
    mse = (err * pair).flatten(1).sum(1) / pairs.clamp_min(1)
    return mse, pairs


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
             device=None, seed=0, progress=False, fid=None, probe=None):
    """Metrics over ``loader`` (collate batches of ``make_collate``) → dict of floats (None when unavailable).

    Keys: ``images``, ``psnr``, ``ssim``, ``codebook_usage``, ``perplexity``, ``fid``; per k in ``mask_words``
    ``masked_word_acc@k`` (our protocol: the MTP decoder gets the features of ``text_encoder.encode(masked
    caption, model.cfg.mask_input)``, by default a caption whose masked tokens the encoder never saw) and
    ``mask{k}_recall_paper`` (the paper's Table 3 protocol: the features of the unmasked caption, the mask vectors
    substituted at the masked positions inside the MTP, i.e. ``mask_input=False``); both on the same k masked word
    tokens per caption, top-1 hits pooled over the masked tokens; equal when the model has ``mask_input=False``.
    ``code_word_mse`` (Table 4, see ``code_word_mse``); ``r1_image_to_text``, ``r1_text_to_image``, ``r1_chance``.
    The text metrics need ``text_encoder`` and a model with text heads.

    The masked-word and code-word metrics reuse the visual tokens of the forward that gives the reconstructions:
    no further forward of the image model. ``progress`` shows a tqdm bar over the batches; ``fid`` is a fresh
    ``FID`` to use instead of loading ``inception_path``. ``probe`` (shapes data): a ``ShapesProbe``
    (``lgvq_fast.downstream.metrics``) that reads the reconstructions; adds ``recon_<attribute>``, the attribute
    scores of ``probe_scores`` (e.g. ``recon_shape``: the fraction of objects whose kind the probe reads back from
    the reconstruction) averaged over the images. Raises ``ValueError`` when the loader yields no image."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if fid is None and inception_path:
        fid = FID(inception_path, device)
    use_text = text_encoder is not None and getattr(model, "sam", None) is not None
    totals = _Totals(model.cfg.codebook_size, mask_words, device)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = _progress_bar(loader, max_batches) if progress else loader
    seen = {}
    hook = None
    if use_text:
        # f_vt's input (the quantized codes [B, T, D]) and output ([B, T + 1, C]) in the model's forward
        hook = model.sam.vt.register_forward_hook(lambda m, args, out: seen.update(codes=args[0], vt=out))
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch["image"].to(device)
            seen.clear()
            out = model(x)
            totals.add_images(x, out, fid)
            if probe is not None:
                totals.add_probe(probe, out["x_rec"], batch["captions"])
            if use_text:
                _text_metrics(model, batch, text_encoder, seen, mask_words, gen, totals)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
        if progress:
            batches.close()
    if totals.images == 0:
        raise ValueError("evaluate: the loader yielded no images (empty dataset, or max_batches=0)")
    return totals.result(fid)


def _progress_bar(loader, max_batches):
    from tqdm import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    return tqdm(loader, total=total, desc="eval", unit="batch", dynamic_ncols=True)


def _text_metrics(model, batch, text_encoder, seen, mask_words, gen, totals):
    """Retrieval features, code-word MSE and masked-word hits of one batch (``seen``: f_vt's codes and output)."""
    vt, codes = seen["vt"], seen["codes"]
    device = vt.device
    text = batch.get("text")
    if text is None:
        text = text_encoder.tokenize(batch["captions"], model.cfg.max_text_len, generator=gen)
    feats = text_encoder.encode(text.to(device), mask_input=model.cfg.mask_input)
    # the unmasked caption's token features: the same for every choice of masked words
    full = getattr(feats, "token_feats_full", feats[0]).to(device)
    totals.vt.append(vt[:, 0].float().cpu())
    totals.tg.append(feats[1].float().cpu())
    totals.caps.extend(batch["captions"])
    mse, pairs = code_word_mse(full, vt[:, 1:], codes, word_positions(text).to(device))
    totals.cw_sum += float(mse[pairs > 0].sum())
    totals.cw_n += int((pairs > 0).sum())
    for k in mask_words:
        tk = mask_k_words(text.to("cpu"), k, gen).to(device)
        n_masked = int(tk.mlm_mask.sum())
        if n_masked == 0:
            continue
        # with mask_input=False our protocol is the paper's: the same features
        ours = text_encoder.encode(tk, mask_input=True)[0].to(device) if model.cfg.mask_input else full
        for key, token_feats in ((f"masked_word_acc@{k}", ours), (f"mask{k}_recall_paper", full)):
            _, acc = model.sam.mtp(vt, token_feats, tk)
            totals.hits[key][0] += float(acc) * n_masked
            totals.hits[key][1] += n_masked


class _Totals:
    """Running sums of ``evaluate``'s metrics."""

    def __init__(self, codebook_size, mask_words, device):
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)
        self.psnr_sum, self.ssim_sum, self.images = 0.0, 0.0, 0
        self.vt, self.tg, self.caps = [], [], []
        self.cw_sum, self.cw_n = 0.0, 0
        self.hits = {key: [0.0, 0] for k in mask_words for key in (f"masked_word_acc@{k}", f"mask{k}_recall_paper")}
        self.probe_sums, self.probe_n, self.probe_rel = {}, 0, 0

    def add_images(self, x, out, fid):
        from torchmetrics.functional import image as tm_image

        x_rec = out["x_rec"].float().clamp(-1, 1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1)
        self.psnr_sum += float((-10 * torch.log10(mse.clamp_min(1e-10))).sum())
        ssim = tm_image.structural_similarity_index_measure((x_rec + 1) / 2, (x + 1) / 2, data_range=1.0,
                                                            reduction="sum")
        self.ssim_sum += float(ssim)
        self.images += x.shape[0]
        self.counts += torch.bincount(out["indices"].flatten(), minlength=self.counts.numel())
        if fid is not None:
            fid.update(x, real=True)
            fid.update(x_rec, real=False)

    def add_probe(self, probe, x_rec, captions):
        from lgvq_fast.downstream.metrics import parse_caption, probe_scores

        truth = [parse_caption(c) for c in captions]
        if any(t is None for t in truth):
            bad = captions[truth.index(None)]
            raise EvalError(f"--probe reads shapes images only: caption {bad!r} is not a shapes caption")
        scores = probe_scores(probe, x_rec.float().clamp(-1, 1), truth)
        for k, v in scores.items():
            if k not in ("n", "n_relation", "relation") and isinstance(v, float):
                self.probe_sums[k] = self.probe_sums.get(k, 0.0) + v * len(captions)
        if scores.get("n_relation"):
            self.probe_sums["relation"] = self.probe_sums.get("relation", 0.0) + scores["relation"] * scores["n_relation"]
            self.probe_rel += scores["n_relation"]
        self.probe_n += len(captions)

    def result(self, fid):
        p = self.counts.float() / self.counts.sum().clamp_min(1)
        result = {
            "images": self.images,
            "psnr": self.psnr_sum / self.images,
            "ssim": self.ssim_sum / self.images,
            "codebook_usage": float((self.counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
            "fid": fid.compute() if fid is not None else None,
        }
        result.update({key: hit / n if n else None for key, (hit, n) in self.hits.items()})
        result["code_word_mse"] = self.cw_sum / self.cw_n if self.cw_n else None
        result.update(retrieval_r1(self.vt, self.tg, self.caps))
        for k, v in self.probe_sums.items():
            result[f"recon_{k}"] = v / (self.probe_rel if k == "relation" else self.probe_n)
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
    from lgvq_fast.training.checkpoint import state_sha256, text_encoder_change

    other_text = text_encoder_change(state.get("text_encoder_sha256"), state_sha256(text_encoder.state_dict()), path)
    if other_text:
        print(f"{other_text} (text encoder {mcfg.text_encoder!r}; its text metrics are not the trained model's)",
              file=sys.stderr, flush=True)
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
    p.add_argument("--probe", help="shapes data: a probe file (lgvq_fast/downstream/metrics.py; the downstream "
                                   "trainer caches one) that reads each reconstruction's shapes: recon_* metrics")
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
    probe = None
    if args.probe:
        from lgvq_fast.downstream.metrics import load_probe

        try:
            probe = load_probe(args.probe, device).eval()
        except ValueError as exc:
            raise EvalError(f"--probe: {one_line_error(exc)}") from exc
    model, text_encoder, cfg = load_checkpoint_model(args.ckpt, device, args.text_encoder)
    d = cfg["data"]
    skip = bool(args.skip_bad_samples or d.get("skip_bad_samples", False))
    annotations, holdout = _eval_annotations(args, d)
    try:
        ds = build_dataset(d["name"], args.split, cfg["model"]["resolution"], seed=cfg["train"]["seed"],
                           root=args.data_root or d.get("root"), size=d.get("val_size"),
                           image_dir=args.image_dir or d.get("val_image_dir") or d.get("image_dir"),
                           annotation_json=annotations, val_holdout=holdout,
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
                      progress=not args.no_progress, probe=probe)
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


def _eval_annotations(args, d):
    """(annotation file, held-out fraction) to evaluate on. A dataset read from one annotation file (COCO) is never
    evaluated on its training images by accident: without ``--annotations`` or the run's ``data.val_annotations``
    the run's held-out images (``data.val_holdout``) are used, or the command stops naming both ways out."""
    from lgvq_fast.data import ANNOTATION_DATASETS

    if args.annotations or d.get("val_annotations"):
        return args.annotations or d.get("val_annotations"), 0.0
    holdout = float(d.get("val_holdout") or 0.0)
    if d.get("name") in ANNOTATION_DATASETS and d.get("annotations") and not holdout and args.split != "train":
        raise EvalError(f"split {args.split}: the checkpoint's run has no validation annotations and held no images "
                        f"out, so {d['annotations']} holds its training images; pass --annotations FILE (and "
                        "--image-dir DIR) of a validation set, or --split train to evaluate on the training images")
    return d.get("annotations"), holdout


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
