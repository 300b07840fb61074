"""The page a person opens first after `mage demo`: report/index.html, built from report.json.

Every picture sits beside its baselines, every number beside what it is compared with, and the time of each
stage is listed. Plain HTML with relative image links, no scripts, so it opens from the folder anywhere.
"""

from __future__ import annotations

import html
from pathlib import Path

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: .9em; color: #444; max-width: 300px; }
img.px { image-rendering: pixelated; border: 1px solid #ddd; }
code, pre { background: #f5f5f5; padding: .1em .3em; } pre { padding: .6em; white-space: pre-wrap; word-break: break-all; }
.good { color: #1a7f37; font-weight: bold; } .bad { color: #b42318; font-weight: bold; } .note { color: #555; font-size: .92em; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _fig(src: str, caption: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return (f'<figure><a href="{_e(src)}"><img class="px" src="{_e(src)}"{w} alt="{_e(caption)}"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdict(ok: bool) -> str:
    return '<span class="good">yes</span>' if ok else '<span class="bad">no</span>'


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def render_index(report: dict) -> str:
    """report.json's dict -> the HTML text of index.html (image paths relative to the report folder)."""
    cfg, times, gen = report["config"], report["times_s"], report["generation"]
    probe, tok = report["linear_probe_top1"], report["tokenizer"]
    rec = gen["tokenizer_reconstructions"]
    fd_ratio = gen["samples"]["frechet_distance"] / max(rec["frechet_distance"], 1e-9)
    score_ratio = gen["samples"]["classifier_score"] / max(rec["classifier_score"], 1e-9)
    threads = report.get("threads", {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>MAGE demo report</title><style>{_CSS}</style>"
             "</head><body>"]
    kind = "quick (pipeline check; the numbers are not meant to be good)" if report.get("quick") else "full"
    parts.append(
        f"<h1>MAGE on Fashion-MNIST: one model that generates and represents</h1>"
        f"<p>This folder was written by <code>mage demo</code> ({_e(kind)} run, seed {cfg['seed']}) in "
        f"<b>{times['total_s'] / 60:.1f} minutes</b> on {_e(threads.get('cpus', '?'))} CPU core(s). It trained a "
        f"VQGAN tokenizer (28x28 grey images to a {_e(report['model']['grid'])}x{_e(report['model']['grid'])} grid of "
        f"tokens from a codebook of {_e(report['model']['codebook_size'])}), then a small MAGE "
        f"({_e(report['model']['summary'])}) on the tokens of {cfg['train_images']} training images. "
        "MAGE masks a random 50-100% of an image's tokens and learns to predict them; the same network then "
        "<i>generates</i> images from nothing (iterative decoding from all-masked) and its encoder gives "
        "<i>features</i> for classification.</p>")

    # Generation.
    parts.append("<h2>1. Generation: samples beside their baselines</h2><div class='row'>")
    parts.append(_fig("samples.png", f"<b>MAGE samples</b>: 64 unconditional images, {cfg['sample_steps']} decoding "
                                     f"steps, choice temperature {cfg['choice_temperature']}."))
    parts.append(_fig("test_images.png", "<b>Real test images</b> (what the samples should look like)."))
    parts.append(_fig("tokenizer_reconstructions.png", "<b>Tokenizer reconstructions</b> of those test images: "
                                                       "the best any model over these tokens can do."))
    parts.append(_fig("shuffled_token_baseline.png", "<b>Shuffled tokens</b>: test images' tokens in random "
                                                     "positions; right token statistics, no structure."))
    parts.append("</div>")
    rows = []
    for name, label in (("test_images", "other real test images (noise floor)"),
                        ("tokenizer_reconstructions", "tokenizer reconstructions"),
                        ("samples", "<b>MAGE samples</b>"), ("shuffled_tokens", "shuffled tokens")):
        if name in gen:
            g = gen[name]
            rows.append([label, f"{g['frechet_distance']:.1f}", f"{g['classifier_score']:.2f}"])
    parts.append(_table(["images", "Frechet distance to the test set (lower is better)",
                         "classifier score (higher is better, 1-10)"], rows))
    parts.append(
        f"<p>Samples vs reconstructions: Frechet distance <b>{fd_ratio:.2f}x</b> theirs (target at most 3x: "
        f"{_verdict(fd_ratio <= 3)}), classifier score <b>{score_ratio * 100:.0f}%</b> of theirs (target at least 70%: "
        f"{_verdict(score_ratio >= 0.7)}).</p>"
        f"<p class='note'>Both are measured in the feature space of a small Fashion-MNIST classifier (test accuracy "
        f"{_pct(report['classifier']['test_accuracy'])}, trained once and cached), on {cfg['num_samples']} images "
        "against real test images. The Frechet distance compares the mean and covariance of the features; the "
        "classifier score is exp(E KL(p(y|x) || p(y))): high when each image is confidently one class and all "
        "classes occur. The tokenizer's reconstructions bound what MAGE can reach with this tokenizer; the shuffled "
        "tokens show what matching the token statistics alone gives.</p>")

    # Inpainting.
    parts.append("<h2>2. Inpainting</h2><div class='row'>")
    parts.append(_fig("inpainting.png", "Top: test images. Middle: a 12x12 hole (grey). Bottom: MAGE fills the "
                                        "tokens under the hole from the rest of the image."))
    parts.append(_fig("inpaint_example.png", "A test image and its hole mask (white = regenerate), to try "
                                             "yourself:", width=112))
    parts.append(_fig("inpaint_mask.png", "inpaint_mask.png", width=112))
    parts.append("</div>")
    parts.append(f"<pre>{_e(report['inpaint_command'])}</pre>")

    # Representation.
    parts.append("<h2>3. Representation: linear probe</h2>")
    names = {"mage": "<b>MAGE encoder</b>, 3x3 grid pool", "mage_c": "<b>MAGE-C encoder</b>, 3x3 grid pool",
             "random_init": "the same encoder, randomly initialised, 3x3 grid pool",
             "mage_global_pool": "MAGE encoder, global pool (the paper's probe)",
             "mage_c_global_pool": "MAGE-C encoder, global pool (the paper's probe)",
             "random_init_global_pool": "randomly initialised encoder, global pool",
             "raw_pixels": "raw pixels (784 values)"}
    rows = [[names.get(k, _e(k)), _pct(v)] for k, v in probe.items()]
    parts.append(_table(["features", "top-1 on held-out test images"], rows))
    best = max(v for k, v in probe.items() if k.startswith("mage"))
    parts.append(
        f"<p>Best MAGE features vs raw pixels: {_pct(best)} vs {_pct(probe['raw_pixels'])} "
        f"(target: at least equal: {_verdict(best >= probe['raw_pixels'])}).</p>"
        f"<p class='note'>Each probe is the same head (BatchNorm without affine parameters, then a linear "
        f"layer) trained with SGD for {cfg['probe_epochs']} epochs on {cfg['probe_train']} training images MAGE never "
        f"saw, tested on {cfg['probe_test']} test images. {_e(report.get('probe_features', ''))}</p>")

    # Training and time.
    parts.append("<h2>4. Training curves and time</h2><div class='row'>")
    parts.append(_fig("tokenizer/curves.png", "Tokenizer training (x: step)."))
    for name in report.get("models", ["mage"]):
        parts.append(_fig(f"{name}/curves.png", f"{_e(name.upper())} training: loss (nats) by step; throughput."))
    parts.append("</div>")
    labels = {"tokenizer_train_s": "tokenizer training", "token_cache_s": "token cache",
              "mage_train_s": "MAGE training", "mage_c_train_s": "MAGE-C training", "classifier_s": "classifier",
              "sampling_s": "sampling", "generation_metrics_s": "generation metrics", "probe_s": "linear probes",
              "total_s": "<b>total</b>"}
    cpu = report.get("cpu_times_s", {})
    rows = [[labels.get(k, _e(k)), f"{v:.0f} s", f"{cpu[k]:.0f} s" if k in cpu else ""] for k, v in times.items()]
    parts.append(_table(["stage", "time", "CPU time (all threads)"], rows))
    parts.append(
        f"<p>Tokenizer: test PSNR {tok['test_psnr_db']:.1f} dB, {tok['used_fraction'] * 100:.0f}% of the codebook "
        f"used. Threads: {_e(threads.get('summary', ''))}</p>")
    parts.append("<p class='note'>All figures are in <code>report.json</code>; the models are "
                 "<code>tokenizer/tokenizer.safetensors</code> and <code>mage/model.safetensors</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_index(report: dict, out_dir: str | Path) -> Path:
    from .checkpoint_io import write_atomic

    return write_atomic(Path(out_dir) / "index.html", render_index(report))
