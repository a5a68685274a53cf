"""Does training with the LG-VQ text losses align the codes with text better than training without them?

    python bench/alignment_ablation.py [--steps 100] [--probe-steps 40]

Two tiny-cpu runs on the captioned-shapes data with identical settings (seed, steps, batch, lr, data order),
one with the text losses (GSA + MTP + RAS) and one with ``--no-text-losses``. Without the text losses the
alignment heads get no training, so their metrics would be chance by construction. To compare the codes
themselves, both tokenizers then go through the same probe: the encoder, codebook and decoder are frozen,
freshly initialised alignment heads (f_vt, MTP decoder, RAM projection) are trained for ``--probe-steps`` steps
with the text losses on the train split, and the probed heads are evaluated on held-out val captions
(masked-word accuracy with 1 and 3 masked words, caption<->image R@1 over the val set). The text run's own
jointly trained heads are reported too. Writes bench/results/alignment_ablation_cpu.json.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def train_run(out, steps, seed, text_losses, weight=None):
    from lgvq_fast import train as train_mod

    args = ["--out", out, "--steps", str(steps), "--seed", str(seed), "--no-progress", "--ckpt-every", "0",
            "--sample-every", "0", "--set", f"model.disc_start={steps + 1}", "--device", "cpu"]
    if not text_losses:
        args.append("--no-text-losses")
    elif weight is not None:
        args += ["--set", f"model.w_gsa={weight}", "--set", f"model.w_mtp={weight}", "--set", f"model.w_ras={weight}"]
    return train_mod.main(args)


def load_tokenizer(ckpt_path, text_encoder):
    """A text-loss-enabled LGVQ holding the checkpoint's tokenizer weights, with fresh alignment heads."""
    from lgvq_fast.models import LGVQConfig, build_model
    from lgvq_fast.train_utils import CheckpointIO

    state = CheckpointIO.load(ckpt_path)
    cfg = LGVQConfig.from_dict(state["config"]["model"])
    cfg.use_text_losses = True
    torch.manual_seed(1234)
    model, _ = build_model(cfg, text_encoder)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("sam.", "ram.")) for k in missing), missing
    return model, state["model"], cfg


def probe(model, cfg, text_encoder, loader, steps, lr):
    """Train only the alignment heads on the frozen tokenizer."""
    heads = [model.sam, model.ram]
    model.requires_grad_(False)
    for h in heads:
        h.requires_grad_(True)
    params = [p for h in heads for p in h.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
    model.eval()
    for h in heads:
        h.train()
    it = iter(loader)
    for _ in range(steps):
        batch = next(it)
        text = batch["text"]
        feats = text_encoder.encode(text, mask_input=cfg.mask_input)
        out = model(batch["image"], text, feats)
        tl = out["text_losses"]
        loss = cfg.w_gsa * tl["gsa"] + cfg.w_mtp * tl["mtp"] + cfg.w_ras * tl["ras"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def main():
    from lgvq_fast.data import EpochBatchSampler, KeyedDataset, ShapesDataset, make_collate
    from lgvq_fast.eval import evaluate
    from lgvq_fast.models import TextEncoder
    from lgvq_fast.train_config import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "alignment_ablation"))
    p.add_argument("--reuse", action="store_true", help="evaluate the runs already in --out instead of training")
    p.add_argument("--w", type=float, help="one weight for all three text losses (default: the preset's)")
    args = p.parse_args()
    t0 = time.perf_counter()
    base = PRESETS["tiny-cpu"]()
    runs = {}
    for name, text_on in (("with_text_losses", True), ("without_text_losses", False)):
        t = time.perf_counter()
        out = os.path.join(args.out, name if not (text_on and args.w is not None) else f"{name}_w{args.w}")
        runs[name] = {"dir": out}
        if args.reuse and os.path.isfile(os.path.join(out, "metrics.jsonl")):
            with open(os.path.join(out, "metrics.jsonl")) as f:
                summary = [json.loads(line) for line in f if '"summary"' in line][-1]["summary"]
        else:
            summary = train_run(out, args.steps, args.seed, text_on, args.w)
        runs[name].update(train_summary=summary, train_wall_s=summary["wall_s"])
    text_encoder = TextEncoder.build(base.model.text_encoder, max_len=base.model.max_text_len)
    res = base.model.resolution
    val = ShapesDataset(args.val_size, res, seed=args.seed, split="val")
    collate = make_collate(text_encoder, base.model.max_text_len, seed=args.seed + 1)
    val_loader = torch.utils.data.DataLoader(val, batch_size=32, shuffle=False, collate_fn=collate)
    train_ds = KeyedDataset(ShapesDataset(base.data.train_size, res, seed=args.seed, split="train"), seed=args.seed)
    for name in runs:
        from lgvq_fast.train_utils import CheckpointIO

        ckpt = CheckpointIO(runs[name]["dir"]).latest()
        if name == "with_text_losses":
            model, state, cfg = load_tokenizer(ckpt, text_encoder)
            model.load_state_dict(state)
            runs[name]["joint_heads"] = evaluate(model, val_loader, text_encoder, seed=args.seed)
        model, _, cfg = load_tokenizer(ckpt, text_encoder)
        sampler = EpochBatchSampler(len(train_ds), base.train.batch_size, seed=args.seed + 7)
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
        t = time.perf_counter()
        probe(model, cfg, text_encoder, loader, args.probe_steps, base.train.lr)
        runs[name]["probe_wall_s"] = time.perf_counter() - t
        runs[name]["probed_heads"] = evaluate(model, val_loader, text_encoder, seed=args.seed)
    payload = {"benchmark": "alignment_ablation", "device": "cpu", "steps": args.steps,
               "probe_steps": args.probe_steps, "val_size": args.val_size, "seed": args.seed,
               "batch_size": base.train.batch_size, "lr": base.train.lr,
               "text_loss_weights": ({"gsa": base.model.w_gsa, "mtp": base.model.w_mtp, "ras": base.model.w_ras}
                                     if args.w is None else {"gsa": args.w, "mtp": args.w, "ras": args.w}),
               "protocol": __doc__.split("\n\n")[2].replace("\n", " "), "runs": runs,
               "total_wall_s": time.perf_counter() - t0}
    os.makedirs(RESULTS, exist_ok=True)
    suffix = ("" if args.w is None else f"_w{args.w}") + ("" if args.seed == 0 else f"_seed{args.seed}")
    path = os.path.join(RESULTS, f"alignment_ablation_cpu{suffix}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    keys = ("psnr", "ssim", "codebook_usage", "masked_word_acc@1", "masked_word_acc@3", "r1_image_to_text",
            "r1_text_to_image", "r1_chance")
    for name, r in runs.items():
        for part in ("joint_heads", "probed_heads"):
            if part in r:
                print(name, part, {k: (round(r[part][k], 4) if r[part][k] is not None else None) for k in keys})
    print(f"wrote {path} ({payload['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
