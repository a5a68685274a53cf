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


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(text, width_chars):
    lines, line = [], ""
    for word in str(text).split():
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def save_captioned_grid(x, x_rec, captions, notes=None, path="grid.png", scale=None, text_lines=4):
    """PNG with one column per image: its caption above (wrapped), the input, its reconstruction (``x_rec`` None:
    the input only), and under them ``notes[i]`` (e.g. the masked-word prediction; None: no notes)."""
    rows = [to_uint8(x)] + ([] if x_rec is None else [to_uint8(x_rec)])
    n, h, w, _ = rows[0].shape
    scale = scale or max(1, 128 // h)
    cell, pad, line_h = w * scale, 6, 12
    chars = max(8, cell // 6)
    cap_lines = [_wrap(c, chars)[:text_lines] for c in captions]
    note_lines = [_wrap(t, chars)[:3] for t in notes] if notes else [[] for _ in range(n)]
    top = line_h * max(1, max(len(c) for c in cap_lines)) + pad
    bottom = line_h * max(len(t) for t in note_lines) + pad if notes else 0
    img = Image.new("RGB", (n * (cell + pad) + pad, top + len(rows) * h * scale + pad + bottom + pad),
                    (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font()
    for i in range(n):
        x0 = pad + i * (cell + pad)
        for j, line in enumerate(cap_lines[i]):
            draw.text((x0, pad // 2 + j * line_h), line, fill=(0, 0, 0), font=font)
        for k, row in enumerate(rows):
            tile = Image.fromarray(row[i]).resize((cell, h * scale), Image.NEAREST)
            img.paste(tile, (x0, top + k * (h * scale + pad // 2)))
        y0 = top + len(rows) * h * scale + pad
        for j, line in enumerate(note_lines[i]):
            draw.text((x0, y0 + j * line_h), line, fill=(40, 40, 160), font=font)
    _save_png(img, path)
    return path


_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _panel(draw, box, title, series, font):
    """A line chart of ``series`` ({name: [(x, y), ...]}) inside ``box`` (x0, y0, x1, y1), own y range."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    points = [p for pts in series.values() for p in pts]
    cursor = x0 + 4
    for k, (text, color) in enumerate([(title, (0, 0, 0))] + [(name, _COLORS[i % len(_COLORS)])
                                                           for i, name in enumerate(series)]):
        draw.text((cursor, y0 - 15), text, fill=color, font=font)
        width = draw.textlength(text, font=font)
        if k:  # a colour key under each series name
            draw.line([(cursor, y0 - 3), (cursor + width, y0 - 3)], fill=color, width=2)
        cursor += width + 14
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xa, xb, ya, yb = min(xs), max(xs), min(ys), max(ys)
    xb, yb = (xb if xb > xa else xa + 1), (yb if yb > ya else ya + 1e-9)
    draw.text((x0 + 4, y0 + 2), f"{yb:.3g}", fill=(90, 90, 90), font=font)
    draw.text((x0 + 4, y1 - 14), f"{ya:.3g}", fill=(90, 90, 90), font=font)
    draw.text((x1 - 60, y1 + 2), f"step {int(xb)}", fill=(90, 90, 90), font=font)

    def at(p):
        return (x0 + 8 + (p[0] - xa) / (xb - xa) * (x1 - x0 - 16), y1 - 8 - (p[1] - ya) / (yb - ya) * (y1 - y0 - 16))

    for k, pts in enumerate(series.values()):
        pts = sorted(pts)
        if len(pts) > 1:
            draw.line([at(p) for p in pts], fill=_COLORS[k % len(_COLORS)], width=2)
        for p in pts[-1:] if len(pts) > 1 else pts:
            cx, cy = at(p)
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=_COLORS[k % len(_COLORS)])


def save_curves(panels, path, width=720, panel_height=170):
    """PNG of stacked line charts: ``panels`` is a list of (title, {name: [(step, value), ...]})."""
    gap = 34
    img = Image.new("RGB", (width, len(panels) * (panel_height + gap) + gap // 2), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font()
    for i, (title, series) in enumerate(panels):
        y0 = gap + i * (panel_height + gap)
        _panel(draw, (10, y0, width - 10, y0 + panel_height), title, series, font)
    _save_png(img, path)
    return path
