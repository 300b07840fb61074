"""Training curves as a PNG, drawn with pillow (no plotting dependency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
SKIP = {"step", "time", "lr", "images_per_s", "grad_norm", "restarted"}


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_curves(jsonl: str | Path, png: str | Path, size: tuple[int, int] = (720, 420)) -> None:
    """One panel per logged loss (everything but step/time/lr/throughput), loss against step."""
    from PIL import Image, ImageDraw

    rows = read_jsonl(jsonl)
    keys = [k for k in rows[0] if k not in SKIP] if rows else []
    W, H = size
    panel_h = H // max(len(keys), 1)
    img = Image.new("RGB", (W, panel_h * max(len(keys), 1)), "white")
    draw = ImageDraw.Draw(img)
    for p, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        top = p * panel_h
        x0, x1, y0, y1 = 60, W - 10, top + 20, top + panel_h - 25
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        draw.text((x0, top + 4), key, fill=(0, 0, 0))
        if len(pts) < 1:
            continue
        xs, ys = [a for a, _ in pts], [b for _, b in pts]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1.0
        smin, smax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        draw.text((4, y0), f"{hi:.3g}", fill=(0, 0, 0))
        draw.text((4, y1 - 10), f"{lo:.3g}", fill=(0, 0, 0))
        draw.text((x1 - 60, y1 + 4), f"step {xs[-1]}", fill=(0, 0, 0))
        line = [(x0 + (x - smin) / (smax - smin) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=COLORS[p % len(COLORS)], width=2)
        else:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=COLORS[0])
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
