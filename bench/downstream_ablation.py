"""Do codes aligned with language make the downstream tasks better? The paper's claim, measured on the shapes data.

    python bench/downstream_ablation.py [--seeds 0 1 2] [--tokenizer-steps N] [--steps N] [--device cpu]

For every seed, two tokenizers are trained with the ``tiny-cpu`` preset (``lgvq_fast/train.py``), identical but
for the text losses: one with them (the preset's weights), one with ``--no-text-losses`` (same seed, data order,
initial weights and draws). Over each frozen tokenizer the same two downstream models are trained
(``lgvq_fast/downstream/train.py``, preset ``tiny-cpu``, same seed): ``caption`` (image codes -> caption) and
``t2i`` (caption -> image codes). Each is scored on the validation split as ``lgvq_fast/downstream/evaluate.py``
describes: caption attribute accuracies and BLEU-4 of greedy captions; t2i attribute accuracies of the generated
images as the probe network reads them; and both tasks' validation cross-entropy. The summary gives, per task and
metric, each arm's mean and standard deviation over seeds and the paired (same seed) difference text - no_text.
Writes bench/results/downstream_ablation/<device>.json (keys ``caption`` and ``t2i``, ``seeds``, ``paired_diff``)
and prints a Markdown table.
"""
import argparse
import json
import os
import time

from _common import mean_std

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = ("text", "no_text")
# the metrics of the README table (all are in the JSON)
TABLE = {"caption": ("object", "colour", "shape", "exact", "bleu4", "val_nll"),
         "t2i": ("object", "colour", "shape", "exact", "val_nll")}


def train_tokenizer(out, seed, text_losses, steps, device):
    from lgvq_fast import train as tokenizer_train
    from lgvq_fast.training.checkpoint import CheckpointIO

    ckpt = CheckpointIO(out).latest()
    if ckpt is None:
        args = ["--out", out, "--seed", str(seed), "--no-progress", "--ckpt-every", "0", "--sample-every", "0",
                "--device", device]
        if steps:
            args += ["--steps", str(steps)]
        if not text_losses:
            args.append("--no-text-losses")
        tokenizer_train.main(args)
        ckpt = CheckpointIO(out).latest()
    return ckpt


def train_downstream(out, tokenizer, task, seed, steps, device, cache_dir, extra):
    from lgvq_fast.downstream import train as downstream_train

    summary_path = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(summary_path):  # finished earlier (the script was restarted): reuse its summary
        with open(summary_path) as f:
            rows = [json.loads(line) for line in f if '"summary"' in line]
        if rows and rows[-1]["summary"].get("eval"):
            return rows[-1]["summary"]
    args = ["--tokenizer", tokenizer, "--task", task, "--out", out, "--seed", str(seed), "--no-progress",
            "--device", device, "--cache-dir", cache_dir, "--ckpt-every", "0"] + list(extra)
    if steps:
        args += ["--steps", str(steps)]
    return downstream_train.main(args)


def summarise(runs, seeds):
    """Per task: per arm, each metric's mean/std over seeds; ``paired_diff``: text - no_text of the same seed."""
    out = {}
    for task in ("caption", "t2i"):
        keys = sorted({k for (a, s, tk), r in runs.items() if tk == task for k, v in r["eval"].items()
                       if isinstance(v, (int, float))})
        per = {arm: {k: mean_std([runs[(arm, s, task)]["eval"].get(k) for s in seeds]) for k in keys} for arm in ARMS}
        per["paired_diff"] = {k: mean_std([runs[("text", s, task)]["eval"][k] - runs[("no_text", s, task)]["eval"][k]
                                           for s in seeds if k in runs[("text", s, task)]["eval"]
                                           and k in runs[("no_text", s, task)]["eval"]]) for k in keys}
        out[task] = per
    return out


def table(summary):
    fmt = lambda d: "-" if d is None else f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = []
    for task, cols in TABLE.items():
        lines += [f"| {task} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arm in ARMS + ("paired_diff",):
            name = {"text": "with text losses", "no_text": "without", "paired_diff": "paired difference"}[arm]
            lines.append(f"| {name} | " + " | ".join(fmt(summary[task][arm].get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tokenizer-steps", type=int, help="tokenizer training steps (default: the tiny-cpu preset's)")
    p.add_argument("--steps", type=int, help="downstream training steps (default: the downstream preset's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join("runs", "downstream_ablation"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every downstream run (e.g. --set train.eval_size=64)")
    p.add_argument("--name", help="results file suffix: bench/results/downstream_ablation/<device>_NAME.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    extra = [x for kv in args.set for x in ("--set", kv)]
    cache_dir = os.path.join(args.out, "codes")
    runs = {}
    for seed in args.seeds:
        for arm in ARMS:
            tok = train_tokenizer(os.path.join(args.out, f"tokenizer_{arm}_seed{seed}"), seed, arm == "text",
                                  args.tokenizer_steps, args.device)
            for task in ("caption", "t2i"):
                t = time.perf_counter()
                summary = train_downstream(os.path.join(args.out, f"{task}_{arm}_seed{seed}"), tok, task, seed,
                                           args.steps, args.device, cache_dir, extra)
                runs[(arm, seed, task)] = {"arm": arm, "seed": seed, "task": task, "tokenizer": tok,
                                           "eval": summary["eval"], "wall_s": time.perf_counter() - t}
                print(f"seed {seed} {arm} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()
                                                                if isinstance(v, float)), flush=True)
    summary = summarise(runs, args.seeds)
    device = args.device.split(":")[0]
    payload = {"benchmark": "downstream_ablation", "device": device, "seeds": args.seeds,
               "tokenizer_steps": args.tokenizer_steps, "downstream_steps": args.steps, "set": args.set,
               "protocol": " ".join(__doc__.split("\n\n")[2].split()),
               **summary, "paired_diff": {task: summary[task]["paired_diff"] for task in summary},
               "runs": list(runs.values()), "total_wall_s": time.perf_counter() - t0}
    path = os.path.join(RESULTS, "downstream_ablation", device + (f"_{args.name}" if args.name else "") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from lgvq_fast.eval import finite_json

    with open(path, "w") as f:
        json.dump(finite_json(payload)[0], f, indent=2)  # NaN (e.g. relation with no two-object truth) -> null
    print(f"\nseeds {args.seeds}; mean ± std over seeds\n")
    print(table(summary))
    print(f"wrote {path} ({payload['total_wall_s']:.0f}s)")
    return payload


if __name__ == "__main__":
    main()
