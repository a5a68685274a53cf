"""The pictures a run leaves (lgvq_fast/training/samples.py, lgvq_fast/images.py): the captioned sample sheet with
masked-word guesses, and curves.png."""
import json

import torch
from _training import run_tiny, text_batch, tiny_setup
from PIL import Image

from lgvq_fast.images import save_captioned_grid, save_curves
from lgvq_fast.training.samples import SampleSheet, save_run_curves


def test_predict_masked_agrees_with_the_mtp_accuracy():
    """predict_masked gives the MTP head's argmax at exactly the masked positions: its hit rate is mtp_acc."""
    cfg, te, model, _ = tiny_setup("vq", mtp_dropout=0.0)
    model.eval()
    x = torch.rand(4, 3, cfg.resolution, cfg.resolution) * 2 - 1
    text = text_batch(te, 4, cfg.max_text_len, seed=3)
    feats = te.encode(text, mask_input=True)
    with torch.no_grad():
        out = model(x, text, feats)
    pred = model.predict_masked(x, text, feats)
    sel = text.mlm_mask & text.pad_mask
    assert bool(((pred >= 0) == sel).all())
    hits = (pred[sel] == text.input_ids[sel]).float().mean()
    torch.testing.assert_close(hits, out["mtp_acc"].float())


class _Shapes(torch.utils.data.Dataset):
    def __init__(self, n, res):
        g = torch.Generator().manual_seed(0)
        self.items = [{"image": torch.rand(3, res, res, generator=g) * 2 - 1,
                       "caption": f"a small red circle number {i}"} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_sample_sheet_names_the_masked_word_and_the_guess(tmp_path, monkeypatch):
    cfg, te, model, _ = tiny_setup("vq")
    sheet = SampleSheet(_Shapes(3, cfg.resolution), 8, te, cfg, torch.device("cpu"), seed=1)
    assert sheet.x.shape[0] == 3 and sheet.text is not None
    assert sheet.text.mlm_mask.sum(1).tolist() == [1, 1, 1]  # one masked word per caption
    monkeypatch.setattr(type(model), "predict_masked",
                        lambda self, x, text, feats: text.input_ids.masked_fill(~text.mlm_mask, -1))
    notes = sheet._masked_words(model, lambda: torch.autocast("cpu", enabled=False))
    assert all(n.startswith('masked "') and n.endswith("(right)") for n in notes), notes
    monkeypatch.setattr(type(model), "predict_masked",
                        lambda self, x, text, feats: torch.zeros_like(text.input_ids).masked_fill(~text.mlm_mask, -1))
    assert all(n.endswith("(wrong)") for n in sheet._masked_words(model, lambda: torch.autocast("cpu", enabled=False)))
    path = sheet.save(model, lambda: torch.autocast("cpu", enabled=False), str(tmp_path / "s.png"))
    w, h = Image.open(path).size
    cell = cfg.resolution * max(1, 128 // cfg.resolution)
    assert w >= 3 * cell and h > 2 * cell + 24  # two image rows plus the caption and note lines


def test_captioned_grid_and_curves_are_written(tmp_path):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    p = save_captioned_grid(x, x, ["one", "two words"], None, str(tmp_path / "g.png"))
    assert Image.open(p).size[0] > 2 * 128
    p = save_curves([("a", {"x": [(0, 1.0), (5, 2.0)]}), ("b", {"y": []})], str(tmp_path / "c.png"))
    assert Image.open(p).size[1] > 2 * 170


def test_a_run_writes_curves_and_captioned_samples(tmp_path):
    run_tiny(tmp_path, "--steps", "4", "--set", "train.eval_every=2", "--set", "train.sample_every=2")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "val_psnr" in r] == [0, 2, 4]  # the start, then every eval_every steps
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "samples" / "step_000004.png").is_file()
    assert Image.open(tmp_path / "curves.png").size[1] >= 5 * 170  # PSNR, L1 and the three text losses
    os_rows = save_run_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "again.png"))
    assert Image.open(os_rows).size == Image.open(tmp_path / "curves.png").size
