"""The pictures a run leaves: a sample sheet of fixed validation images (each caption above the input and its
reconstruction, and the MTP head's guess for one masked word of the caption) and ``curves.png`` (validation PSNR,
the reconstruction and text losses against step, read from ``metrics.jsonl``)."""
import json
import os

import torch

from lgvq_fast.images import save_captioned_grid, save_curves
from lgvq_fast.training.metrics import reconstruct


class SampleSheet:
    """``n`` fixed validation images with their captions; :meth:`save` draws the model's reconstructions and, when
    the model has its text heads, its prediction of one masked word per caption (the same word every time)."""

    def __init__(self, val_ds, n, text_encoder, mcfg, device, seed=0):
        items = [val_ds[i] for i in range(min(n, len(val_ds)))]
        self.x = torch.stack([it["image"] for it in items]).to(device)
        self.captions = [str(it.get("caption", "")) for it in items]
        self.text_encoder, self.mask_input, self.text = text_encoder, mcfg.mask_input, None
        if mcfg.use_text_losses and text_encoder is not None and all(self.captions):
            from lgvq_fast.eval import mask_k_words

            gen = torch.Generator().manual_seed(seed)
            batch = text_encoder.tokenize(self.captions, mcfg.max_text_len, generator=gen)
            self.text = mask_k_words(batch, 1, gen)

    def save(self, model, autocast, path):
        x_rec = reconstruct(model, self.x, autocast)
        notes = self._masked_words(model, autocast) if self.text is not None else None
        return save_captioned_grid(self.x, x_rec, self.captions, notes, path)

    @torch.no_grad()
    def _masked_words(self, model, autocast):
        was_training = model.training
        model.eval()
        with autocast():
            text = self.text.to(self.x.device)
            feats = self.text_encoder.encode(text, mask_input=self.mask_input)
            guess = model.predict_masked(self.x, text, feats).cpu()
        model.train(was_training)
        notes = []
        for ids, mask, pred in zip(self.text.input_ids, self.text.mlm_mask, guess):
            pos = mask.nonzero().flatten().tolist()
            if not pos:
                notes.append("")
                continue
            want, got = self._word(ids[pos[0]]), self._word(pred[pos[0]])
            notes.append(f'masked "{want}": guessed "{got}" {"(right)" if want == got else "(wrong)"}')
        return notes

    def _word(self, token_id):
        token = self.text_encoder.tokenizer.convert_ids_to_tokens(int(token_id))
        return str(token).replace("</w>", "").removeprefix("##")


def save_run_curves(metrics_path, path):
    """``curves.png`` from a run's ``metrics.jsonl``: validation PSNR, the reconstruction loss (L1) and each text
    loss against step (the last run in the file; rows a resumed run dropped are not there)."""
    val, train = [], {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "val_psnr" in row:
                val.append((row["step"], row["val_psnr"]))
            elif "summary" in row:
                val.append((row["summary"]["step"], row["summary"]["val_psnr_end"]))
            elif "step" in row:
                for key in ("l1", "gsa", "mtp", "ras"):
                    if key in row:
                        train.setdefault(key, []).append((row["step"], row[key]))
    panels = [("validation PSNR (dB)", {"val_psnr": sorted(set(val))}),
              ("reconstruction loss (training batches)", {"l1": train.get("l1", [])})]
    names = {"gsa": "GSA (global semantic alignment)", "mtp": "MTP (masked text prediction)",
             "ras": "RAS (relationship alignment)"}
    panels += [(names[k], {k: train[k]}) for k in ("gsa", "mtp", "ras") if k in train]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return save_curves(panels, path)
