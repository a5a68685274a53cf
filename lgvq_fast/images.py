"""PNG pictures of a run, written atomically (temp file + rename): reconstruction grids and the code-usage
histogram. Used by the trainer and by ``python -m lgvq_fast.eval``."""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x):
    """[B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_recon_grid(x, x_rec, path, scale=None):
    """PNG with the inputs on the top row and their reconstructions below."""
    a, b = to_uint8(x), to_uint8(x_rec)
    n, h, w, _ = a.shape
    grid = np.concatenate([np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)], axis=0)
    img = Image.fromarray(grid)
    scale = scale or max(1, 128 // h)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _save_png(img, path)
    return path


def save_usage_histogram(counts, path, width=512, height=160):
    """Bar chart (PNG) of how often each code was picked, codes sorted by frequency."""
    counts = torch.as_tensor(counts).float().sort(descending=True).values
    k = counts.numel()
    img = Image.new("RGB", (width, height + 20), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    top = float(counts.max()) or 1.0
    for i, c in enumerate(counts.tolist()):
        x0 = int(i * width / k)
        x1 = max(x0, int((i + 1) * width / k) - 1)
        y = height - int(c / top * (height - 4))
        draw.rectangle([x0, y, x1, height], fill=(60, 90, 200))
    used = int((counts > 0).sum())
    draw.text((4, height + 4), f"codes used: {used}/{k} (sorted by frequency)", fill=(0, 0, 0))
    _save_png(img, path)
    return path


def _save_png(img, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
