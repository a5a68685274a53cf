"""The downstream tasks' metrics on the validation split, as the trainer, ``sample`` and the ablation compute them.

* both tasks: ``val_nll``, the mean cross-entropy (nats per target token) of the whole validation split's targets
  under teacher forcing (caption: caption tokens after the start token; t2i: every image code);
* ``caption`` (greedy decoding of the first ``train.eval_size`` validation images): on the shapes data the
  attribute scores of ``metrics.caption_scores`` (each generated caption parsed and compared with the scene), and
  BLEU-4 against the image's captions (shapes: the caption and its equivalent swapped form);
* ``t2i`` (one sample per prompt for the first ``train.eval_size`` validation captions, with ``train.top_k`` /
  ``top_p`` / ``temperature`` / ``cfg_scale``, decoded by the tokenizer): on the shapes data the attribute scores
  of the generated images as the probe network reads them (``metrics.probe_scores``; the probe's own scores on
  real images are reported beside them as ``probe_real_*``), and FID against the validation images when
  ``train.inception`` names local Inception weights.
"""
import os

import torch

from lgvq_fast.data.shapes import caption_of, geometry_tag, sample_scene
from lgvq_fast.downstream.tasks import generate_captions, generate_codes, make_batch


def _batches(cache, n, batch_size, vocab=None):
    """(row list, codes [B,h,w], TextBatch) over the first ``n`` rows of ``cache`` (first caption of each), the
    text in ``vocab``'s numbering when given."""
    from lgvq_fast.downstream.codes import collate_codes

    ds = cache.dataset(seed=0)
    for lo in range(0, n, batch_size):
        keys = [(i, 0, 0) for i in range(lo, min(n, lo + batch_size))]
        codes, text = collate_codes([ds[k] for k in keys])
        yield [k[0] for k in keys], codes, (text if vocab is None else vocab.encode_text(text))


@torch.no_grad()
def val_nll(model, cache, task, batch_size, device, autocast, vocab):
    """Mean cross-entropy (nats per target token) over every item of ``cache``."""
    total, count = torch.zeros((), dtype=torch.float64), 0.0
    for _, codes, text in _batches(cache, cache.n, batch_size, vocab):
        batch = make_batch(task, codes, text).to(device)
        with autocast():
            logits, _ = model(**batch.inputs())
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.target.flatten(), reduction="none")
        w = batch.target_mask.flatten().float()
        total += float((ce * w).sum())
        count += float(w.sum())
    return float(total / max(count, 1.0))


def shapes_truth(cache, indices):
    """Ground-truth scenes (``metrics.Scene``) and captions of shapes-cache items ``indices``."""
    from lgvq_fast.downstream.metrics import scene_of

    spec = cache.meta["data"]
    scenes = [sample_scene(spec["seed"], cache.meta["split"], int(cache.scene_index(i))) for i in indices]
    return [scene_of(objs, rel) for objs, rel in scenes], [caption_of(objs, rel) for objs, rel in scenes]


def caption_metrics(model, cache, text_encoder, n, batch_size, vocab):
    """Greedy captions of the first ``n`` images of ``cache`` and their scores; returns (scores, captions)."""
    from lgvq_fast.downstream.metrics import bleu4, caption_scores

    generated, indices = [], []
    for idx, codes, _ in _batches(cache, n, batch_size):
        generated += generate_captions(model, codes, text_encoder, vocab=vocab, greedy=True)
        indices += idx
    scores = {}
    if cache.meta["data"]["name"] == "shapes":
        truth, captions = shapes_truth(cache, indices)
        scores.update(caption_scores(generated, truth))
        scores["bleu4"] = bleu4(generated, captions)
    else:
        refs = [cache.captions(i, text_encoder) for i in indices]
        scores["bleu4"] = bleu4(generated, refs)
    return scores, generated


def t2i_samples(model, cache, tokenizer, t, n, seed, vocab):
    """(indices, prompt TextBatch rows' images [n,3,H,W] float in [-1,1]) generated for the first ``n`` captions."""
    g = torch.Generator(device=model.device).manual_seed(int(seed))
    grid = tuple(cache.grid)
    images, indices = [], []
    for idx, _, text in _batches(cache, n, t.eval_batch):
        codes = generate_codes(model, text, grid, vocab=vocab, top_k=t.top_k, top_p=t.top_p, temperature=t.temperature,
                               cfg_scale=t.cfg_scale, generator=g)
        images.append(decode(tokenizer, codes))
        indices += idx
    return indices, torch.cat(images)


@torch.no_grad()
def decode(tokenizer, codes):
    """Images [B,3,H,W] float in [-1,1] on the CPU of code indices [B,h,w] (the tokenizer's decoder)."""
    dev = next(tokenizer.parameters()).device
    return tokenizer.decode_indices(codes.to(dev)).float().clamp(-1, 1).cpu()


def get_probe(cfg, resolution, device, log=print):
    """The shapes probe: ``train.probe`` when given, else the one trained once into ``data.cache_dir``."""
    from lgvq_fast.downstream.metrics import load_probe, save_probe, train_probe

    # the cached probe's name carries the renderer's geometry: a change of the drawing trains a new one
    path = cfg.train.probe or os.path.join(cfg.data.cache_dir, f"shapes_probe_r{resolution}_{geometry_tag()}.pt")
    if cfg.train.probe is None and not os.path.exists(path):
        log(f"training the shapes probe that reads generated images (once; saved to {path})")
        save_probe(train_probe(resolution=resolution, device=device, progress=cfg.train.progress), path)
    probe = load_probe(path)
    if getattr(probe, "resolution", resolution) != resolution:
        raise ValueError(f"probe {path} reads {probe.resolution}x{probe.resolution} images, the tokenizer makes "
                         f"{resolution}x{resolution}")
    return probe.to(device).eval()


def t2i_metrics(cfg, s, model, device, seed):
    """Scores of the images generated for the first ``train.eval_size`` validation captions; returns
    (scores, indices, generated images)."""
    from lgvq_fast.downstream.metrics import probe_accuracy_on_real, probe_scores

    cache, t = s.caches["val"], cfg.train
    n = min(t.eval_size, cache.n)
    indices, images = t2i_samples(model, cache, s.tokenizer, t, n, seed, s.vocab)
    scores = {}
    if cache.meta["data"]["name"] == "shapes":
        resolution = images.shape[-1]
        probe = get_probe(cfg, resolution, device)
        truth, _ = shapes_truth(cache, indices)
        scores.update(probe_scores(probe, images.to(device), truth))
        real = probe_accuracy_on_real(probe, n, resolution, seed=cache.meta["data"]["seed"])
        scores.update({f"probe_real_{k}": v for k, v in real.items()})
    if t.inception:
        scores["fid"] = _fid(t.inception, cache, s.tokenizer, images, device, t.eval_batch)
    return scores, indices, images


def _fid(inception, cache, tokenizer, images, device, batch_size):
    """FID of ``images`` against the tokenizer's reconstructions of as many validation images (the cache holds
    codes, not pixels: the reference is what a perfect t2i model over this tokenizer would produce)."""
    from lgvq_fast.eval import FID

    fid = FID(inception, device)
    n = images.shape[0]
    for lo in range(0, n, batch_size):
        fid.update(images[lo:lo + batch_size].to(device), real=False)
    for _, codes, _ in _batches(cache, n, batch_size):
        fid.update(decode(tokenizer, codes).to(device), real=True)
    return float(fid.compute())


def evaluate_task(cfg, s, run, final, step):
    """The task's metrics (rank 0; the other ranks wait), plus the sample grid ``samples/step_<step>.png``."""
    t = cfg.train
    result = {}
    if run.is_main:
        model = s.model
        was_training = model.training
        model.eval()
        result["val_nll"] = val_nll(model, s.caches["val"], t.task, t.eval_batch, run.device, s.autocast, s.vocab)
        with s.autocast():
            if t.task == "caption":
                scores, generated = caption_metrics(model, s.caches["val"], s.text_encoder,
                                                    min(t.eval_size, s.caches["val"].n), t.eval_batch, s.vocab)
                result.update(scores)
                _caption_grid(s, generated[:8], os.path.join(run.out_dir, "samples", f"step_{step:06d}.png"))
            else:
                scores, indices, images = t2i_metrics(cfg, s, model, run.device, t.seed)
                result.update(scores)
                _t2i_grid(s, indices[:8], images[:8], os.path.join(run.out_dir, "samples", f"step_{step:06d}.png"))
        model.train(was_training)
    run.barrier(f"the step-{step} evaluation")
    return result


def _caption_grid(s, generated, path):
    from lgvq_fast.images import save_captioned_grid

    cache = s.caches["val"]
    n = len(generated)
    _, codes, text = next(_batches(cache, n, n))
    recon = decode(s.tokenizer, codes)
    truth = [cache.captions(i, s.text_encoder)[0] for i in range(n)]
    save_captioned_grid(recon, None, truth, notes=[f"model: {c}" for c in generated],
                        path=path)


def _t2i_grid(s, indices, images, path):
    from lgvq_fast.images import save_captioned_grid

    cache = s.caches["val"]
    _, codes, _ = next(_batches(cache, len(indices), len(indices)))
    prompts = [cache.captions(i, s.text_encoder)[0] for i in indices]
    save_captioned_grid(decode(s.tokenizer, codes), images, prompts,
                        notes=["1st row: the real image's codes; 2nd: generated"] + [""] * (len(indices) - 1),
                        path=path)
