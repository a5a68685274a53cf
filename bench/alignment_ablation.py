"""Does training with the LG-VQ text losses align the codes with text better than training without them?

    python bench/alignment_ablation.py [--steps N] [--seeds 0 1 2] [--weights 0.1 0.01]

For every seed, tiny-cpu runs on the captioned-shapes data with identical settings (the preset's: steps unless
``--steps``, batch, lr schedule, GAN start; seed, data order, initial weights, every random draw), one with
``--no-text-losses`` and one per text-loss weight (GSA + MTP + RAS; default the preset's). The trainer makes the arms differ only through the text losses: at weight 0 a text run is bit-identical to
the run without them (tests/training/test_train_loop.py). Without the text losses the
alignment heads get no training, so their metrics would be chance by construction. To compare the codes
themselves, both tokenizers then go through the same probe: the encoder, codebook and decoder are frozen,
freshly initialised alignment heads (f_vt, MTP decoder, RAM projection) are trained for ``--probe-steps`` steps
with the text losses on the train split, and the probed heads are evaluated on held-out val captions
(masked-word accuracy with 1 and 3 masked words in both protocols, caption<->image R@1 over the val set, the
code-word relation MSE of Table 4). The text runs' own
jointly trained heads are reported too. The summary gives each arm's mean and standard deviation over seeds and
the paired (same seed) difference to the run without text losses. Writes
bench/results/alignment_ablation/cpu[_<name>].json and prints a Markdown table.
"""
import argparse
import json
import os
import time

import torch
from _common import mean_std

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def train_run(out, steps, seed, text_losses, weight=None):
    from lgvq_fast import train as train_mod

    args = ["--out", out, "--steps", str(steps), "--seed", str(seed), "--no-progress", "--ckpt-every", "0",
            "--sample-every", "0", "--device", "cpu"]
    if not text_losses:
        args.append("--no-text-losses")
    elif weight is not None:
        args += ["--set", f"model.w_gsa={weight}", "--set", f"model.w_mtp={weight}", "--set", f"model.w_ras={weight}"]
    return train_mod.main(args)


def load_tokenizer(ckpt_path, text_encoder):
    """A text-loss-enabled LGVQ holding the checkpoint's tokenizer weights, with fresh alignment heads."""
    from lgvq_fast.models import LGVQConfig, build_model
    from lgvq_fast.training.checkpoint import CheckpointIO

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
        # the same unit weights for every arm (not the run's own weights: Adam's eps would make the probe
        # depend on the loss scale the tokenizer happened to be trained with)
        loss = tl["gsa"] + tl["mtp"] + tl["ras"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


KEYS = ("psnr", "ssim", "codebook_usage", "masked_word_acc@1", "masked_word_acc@3", "mask1_recall_paper",
        "mask3_recall_paper", "r1_image_to_text", "r1_text_to_image", "code_word_mse")


def summarise(runs, arms, seeds):
    """Per arm: mean/std over seeds of the probed metrics; per text arm: the paired (same seed) difference."""
    out = {}
    for arm in arms:
        out[arm] = {k: mean_std([runs[(arm, s)]["probed_heads"][k] for s in seeds]) for k in KEYS}
        if arm != "off":
            out[arm]["paired_diff_vs_off"] = {
                k: mean_std([runs[(arm, s)]["probed_heads"][k] - runs[("off", s)]["probed_heads"][k] for s in seeds])
                for k in KEYS}
    return out


def main():
    from lgvq_fast.data import EpochBatchSampler, KeyedDataset, ShapesDataset, make_collate
    from lgvq_fast.eval import evaluate
    from lgvq_fast.models import TextEncoder
    from lgvq_fast.training.config import preset_config
    from lgvq_fast.training.checkpoint import CheckpointIO

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="training steps of each run (default: the preset's)")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--weights", type=float, nargs="+",
                   help="text-loss weight arms (one weight for all three losses; default: the preset's)")
    p.add_argument("--out", default=os.path.join("runs", "alignment_ablation"))
    p.add_argument("--reuse", action="store_true", help="evaluate the runs already in --out instead of training")
    p.add_argument("--name", help="results file suffix: bench/results/alignment_ablation/cpu_NAME.json "
                                  "(default: none, cpu.json)")
    args = p.parse_args()
    t0 = time.perf_counter()
    base = preset_config("tiny-cpu")
    args.steps = args.steps or base.train.steps
    preset_w = {"gsa": base.model.w_gsa, "mtp": base.model.w_mtp, "ras": base.model.w_ras}
    arms = ["off"] + ([f"w{w:g}" for w in args.weights] if args.weights else ["preset"])
    weight_of = {f"w{w:g}": w for w in (args.weights or [])}
    text_encoder = TextEncoder.build(base.model.text_encoder, max_len=base.model.max_text_len)
    res = base.model.resolution
    runs = {}
    for seed in args.seeds:
        val = ShapesDataset(args.val_size, res, seed=seed, split="val")
        collate = make_collate(text_encoder, base.model.max_text_len, seed=seed + 1)
        val_loader = torch.utils.data.DataLoader(val, batch_size=32, shuffle=False, collate_fn=collate)
        train_ds = KeyedDataset(ShapesDataset(base.data.train_size, res, seed=seed, split="train"), seed=seed)
        for arm in arms:
            out = os.path.join(args.out, f"steps{args.steps}_seed{seed}_{arm}")
            r = runs[(arm, seed)] = {"dir": out, "arm": arm, "seed": seed}
            if args.reuse and os.path.isfile(os.path.join(out, "metrics.jsonl")):
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    summary = [json.loads(line) for line in f if '"summary"' in line][-1]["summary"]
            else:
                summary = train_run(out, args.steps, seed, arm != "off", weight_of.get(arm))
            r.update(train_val_psnr_end=summary["val_psnr_end"], train_wall_s=summary["wall_s"])
            ckpt = CheckpointIO(out).latest()
            if arm != "off":
                model, state, cfg = load_tokenizer(ckpt, text_encoder)
                model.load_state_dict(state)
                r["joint_heads"] = evaluate(model, val_loader, text_encoder, seed=seed)
            model, _, cfg = load_tokenizer(ckpt, text_encoder)
            sampler = EpochBatchSampler(len(train_ds), base.train.batch_size, seed=seed + 7)
            loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
            t = time.perf_counter()
            probe(model, cfg, text_encoder, loader, args.probe_steps, base.train.lr)
            r["probe_wall_s"] = time.perf_counter() - t
            r["probed_heads"] = evaluate(model, val_loader, text_encoder, seed=seed)
            print(f"seed {seed} {arm}: " + ", ".join(f"{k} {r['probed_heads'][k]:.4f}" for k in KEYS), flush=True)
    summary = summarise(runs, arms, args.seeds)
    # R@1 chance from evaluate(): duplicate captions in the val set count as hits, so it exceeds 1/val_size
    chances = [r["probed_heads"]["r1_chance"] for r in runs.values() if r["probed_heads"]["r1_chance"] is not None]
    chance = sum(chances) / len(chances) if chances else None
    payload = {"benchmark": "alignment_ablation", "device": "cpu", "steps": args.steps,
               "probe_steps": args.probe_steps, "val_size": args.val_size, "seeds": args.seeds,
               "batch_size": base.train.batch_size, "lr": base.train.lr,
               "arms": {a: ({"gsa": weight_of[a], "mtp": weight_of[a], "ras": weight_of[a]} if a in weight_of
                            else preset_w if a == "preset" else None) for a in arms},
               "r1_chance": chance,
               "protocol": __doc__.split("\n\n")[2].replace("\n", " "), "summary": summary,
               "runs": [r for r in runs.values()], "total_wall_s": time.perf_counter() - t0}
    path = os.path.join(RESULTS, "alignment_ablation", "cpu" + (f"_{args.name}" if args.name else "") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    fmt = lambda d: "-" if d is None else f"{d['mean']:.3f} ± {d['std']:.3f}"
    cols = ("psnr", "masked_word_acc@1", "mask1_recall_paper", "r1_image_to_text", "r1_text_to_image", "code_word_mse")
    print(f"\n{args.steps} steps, seeds {args.seeds}, probe {args.probe_steps} steps, {args.val_size} val captions "
          f"(R@1 chance {chance or 0:.4f}); mean ± std over seeds")
    print("| arm | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for arm in arms:
        print(f"| {arm} | " + " | ".join(fmt(summary[arm][k]) for k in cols) + " |")
        if arm != "off":
            print(f"| {arm} − off (paired) | " + " | ".join(fmt(summary[arm]["paired_diff_vs_off"][k]) for k in cols)
                  + " |")
    print(f"wrote {path} ({payload['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
