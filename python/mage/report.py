"""Run outputs that need no plotting library: metrics as JSONL, image grids and curve plots as PNG (pillow)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ._checks import InputValueError, check_int
from .checkpoint_io import check_writable, write_atomic


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):  # anything else is not ours
                records.append(record)
    return records


class JsonlLogger:
    """Appends one JSON object per line, flushed at once, so a killed run keeps every record it wrote.

    `resume_step`: records with "step" > resume_step (written after the checkpoint being resumed) are dropped,
    so a resumed run's log has no duplicates. Without `resume_step` an existing file is replaced (a fresh run).
    The folder of `path` must exist.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        check_writable(self.path, "JsonlLogger: path")
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        self._file.write(json.dumps(values) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] (C = 1 or 3) -> one [3, H', W'] image, `nrow` images per row."""
    check_int("image_grid", "nrow", nrow, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InputValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    x = images.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1)
    cols = min(nrow, max(n, 1))
    rows = math.ceil(n / cols)
    grid = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def save_image(image: torch.Tensor, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write [C, H, W] in [0, 1] as PNG, optionally enlarged `scale` times with nearest neighbours (28px images).
    The folder of `path` must exist."""
    from PIL import Image

    check_writable(path, "save_image: path")
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
    pil = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputValueError(f"save_image: path {path}: unknown image file extension (use .png)")
    encoded = io.BytesIO()
    pil.save(encoded, format=fmt)
    return write_atomic(path, encoded.getvalue())  # an interrupted overwrite leaves the old picture, not half of it


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> Path:
    return save_image(image_grid(images, nrow), path, scale)


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
_LABELS = {"elapsed_min": "elapsed (min)", "images_per_s": "images/s", "lr": "learning rate"}


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def plot_curves(
    records: Iterable[dict[str, Any]],
    path: str | os.PathLike,
    keys: Sequence[str] | None = None,
    x_key: str = "step",
    panel_size: tuple[int, int] = (440, 200),
    log_y: Sequence[str] = ("lr",),
) -> Path:
    """One line-plot panel per metric (stacked vertically) from JSONL-style records, as PNG.

    keys: the metrics to draw (default: every numeric key except `x_key`); records without a key are skipped in
    that panel. Keys in `log_y` use a log scale where all values are positive. A "time" key (Unix seconds) is
    drawn as "elapsed_min", minutes since the first record. The folder of `path` must exist.
    """
    from PIL import Image, ImageDraw

    check_writable(path, "plot_curves: path")
    records = [dict(r) for r in records if x_key in r]
    start = next((r["time"] for r in records if isinstance(r.get("time"), (int, float))), None)
    for r in records:
        t = r.pop("time", None)
        if isinstance(t, (int, float)):
            r["elapsed_min"] = (t - start) / 60
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if k != x_key and isinstance(v, (int, float))})
    pw, ph = panel_size
    margin_l, margin_r, margin_t, margin_b = 64, 16, 20, 30
    canvas = Image.new("RGB", (pw, ph * max(len(keys), 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for p, key in enumerate(keys):
        pts = [(float(r[x_key]), float(r[key])) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        top = p * ph
        x0, y0, x1, y1 = margin_l, top + margin_t, pw - margin_r, top + ph - margin_b
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        draw.text((x0, top + 4), _LABELS.get(key, key), fill="black")
        if not pts:
            continue
        use_log = key in log_y and all(v > 0 for _, v in pts)
        ys = [math.log10(v) if use_log else v for _, v in pts]
        xs = [x for x, _ in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        xspan, yspan = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
        coords = [(x0 + (x - xmin) / xspan * (x1 - x0), y1 - (y - ymin) / yspan * (y1 - y0)) for x, y in zip(xs, ys)]
        if len(coords) == 1:
            cx, cy = coords[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=_COLORS[p % len(_COLORS)])
        else:
            draw.line(coords, fill=_COLORS[p % len(_COLORS)], width=2)
        lo, hi = (10**ymin, 10**ymax) if use_log else (ymin, ymax)
        for text, y in ((_fmt(hi), y0), (_fmt(lo), y1 - 10)):  # y labels right-aligned in the left margin
            draw.text((x0 - 4 - draw.textlength(text), y), text, fill="black")
        draw.text((x0, y1 + 4), _fmt(xmin), fill="black")
        right = _fmt(xmax)
        draw.text((x1 - draw.textlength(right), y1 + 4), right, fill="black")
        name = _LABELS.get(x_key, x_key)
        draw.text(((x0 + x1 - draw.textlength(name)) / 2, y1 + 15), name, fill=(90, 90, 90))
    encoded = io.BytesIO()
    canvas.save(encoded, format="PNG")
    return write_atomic(path, encoded.getvalue())
