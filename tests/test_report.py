"""JSONL metrics (resume-safe), image grids and curve plots."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mage.report import JsonlLogger, image_grid, plot_curves, read_jsonl, save_image_grid


def test_jsonl_logger_resume_drops_later_records(tmp_path):
    path = tmp_path / "m.jsonl"
    with JsonlLogger(path) as log:
        for step in range(5):
            log.log({"step": step, "loss": torch.tensor(1.0 / (step + 1)), "lr": 0.1})
    with open(path, "a") as f:
        f.write('{"step": 5, "loss"')  # torn line from a killed process
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4]
    with JsonlLogger(path, resume_step=2) as log:
        log.log({"step": 3, "loss": 0.0})
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[-1]["loss"] == 0.0
    assert records[1]["loss"] == 0.5
    with JsonlLogger(path) as log:  # a fresh run starts a fresh file
        log.log({"step": 0})
    assert read_jsonl(path) == [{"step": 0}]
    assert json.loads(path.read_text()) == {"step": 0}


def test_image_grid_layout_and_png(tmp_path):
    images = torch.zeros(5, 1, 4, 6)
    for i in range(5):
        images[i] = i / 4
    grid = image_grid(images, nrow=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1)
    torch.testing.assert_close(grid[:, 1 + 5, 1], torch.full((3,), 3 / 4))  # image 3: row 1, column 0
    assert grid[:, 7, 16].eq(1).all()  # the empty sixth cell keeps the pad value
    path = save_image_grid(images, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(path) as im:
        assert im.size == (2 * (3 * 6 + 4 * 2), 2 * (2 * 4 + 3 * 2)) and im.mode == "RGB"
    with pytest.raises(ValueError, match="N, 1 or 3"):
        image_grid(torch.zeros(2, 2, 4, 4))


def test_plot_curves_draws_each_metric(tmp_path):
    records = [{"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3 * min(1, (s + 1) / 5)} for s in range(30)]
    records.append({"step": 30, "probe_top1": 0.8})
    path = plot_curves(records, tmp_path / "curves.png", panel_size=(300, 150))
    with Image.open(path) as im:
        assert im.size == (300, 3 * 150)
        rgb = torch.from_numpy(np.asarray(im).reshape(-1, 3).astype(np.int64))
    coloured = (rgb.max(1).values - rgb.min(1).values) > 60  # the line colours, not black/grey/white
    assert int(coloured.sum()) > 100
