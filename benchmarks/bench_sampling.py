"""End-to-end sampling throughput (images/s): `mage.generate` against the published sampler's loop.

Providers:
    eager-ref   gen_img_uncond.py restated (docs/REFERENCE.md 5): full logits, softmax, categorical sample,
                numpy Gumbel noise on the host, sort and `<=` cut-off read back per step.
    mage        `mage.generate`: `remask_step_from_hidden` (no logits tensor), no host sync.
    mage-graph  the same, one batch captured as a CUDA graph (CUDA only).

    python benchmarks/bench_sampling.py --model base --batch 32 --steps 20 --dtype fp32 bf16
prints one line per (provider, dtype) with seconds per batch and images/s. ViT-B on a 2-core CPU takes
~1 min per image at 20 steps: measure a small batch there and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Case, write_csv  # noqa: E402

import mage  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# GFLOP per image (docs/REFERENCE.md 4.12, 3.4): one sampling step of ViT-B, and the VQGAN decode.
STEP_GFLOP = {"base": 78.0}
DECODE_GFLOP = 187.0


def build(size: str, device: str) -> mage.MAGE:
    if size == "tiny":
        model = mage.mage_vit_tiny(depth=4, decoder_depth=2, tokenizer=mage.TokenizerConfig.tiny())
    else:
        model = {"base": mage.mage_vit_base_patch16, "large": mage.mage_vit_large_patch16}[size]()
    return model.to(device).eval()


@torch.no_grad()
def eager_ref_generate(model: mage.MAGE, batch: int, steps: int, choice_temperature: float, dtype) -> torch.Tensor:
    """The published per-batch loop (host syncs and host noise included), for comparison only."""
    c = model.config
    L, K, device = c.num_tokens, c.codebook_size, model.device
    ids = torch.full((batch, L), c.mask_id, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        for step in range(steps):
            cur = ids.clone()
            unknown = cur == c.mask_id
            logits = model(ids, mask=unknown)[:, 1:, :K].float()
            probs = torch.softmax(logits, dim=-1)
            sampled = torch.distributions.Categorical(logits=logits).sample()
            sampled = torch.where(unknown, sampled, cur)
            ratio = (step + 1) / steps
            mask_ratio = math.cos(math.pi / 2.0 * ratio)
            selected = torch.gather(probs, -1, sampled[..., None])[..., 0]
            selected = torch.where(unknown, selected.double(), torch.inf).float()
            mask_len = torch.tensor([math.floor(L * mask_ratio)], device=device)
            mask_len = torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len)
            mask_len = torch.maximum(torch.ones_like(mask_len), mask_len)
            gumbel = torch.from_numpy(np.random.gumbel(size=selected.shape)).float().to(device)
            confidence = torch.log(selected) + choice_temperature * (1 - ratio) * gumbel
            cut = torch.sort(confidence, dim=-1).values[:, mask_len[0].long() - 1 : mask_len[0].long()]
            ids = torch.where(confidence <= cut, c.mask_id, sampled)
        return model.vqgan.decode(sampled).float()


GRAPH_BATCHES = 4  # mage-graph captures once per generate() call: amortise the capture over 4 batches


def providers(model: mage.MAGE, batch: int, steps: int, dtype, device: str) -> dict:
    """name -> (fn, batches per call)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {
        "eager-ref": (lambda: eager_ref_generate(model, batch, steps, 6.0, dtype), 1),
        "mage": (lambda: mage.generate(model, batch, steps=steps, batch_size=batch, generator=gen, dtype=dtype), 1),
    }
    if device == "cuda":
        out["mage-graph"] = (lambda: mage.generate(model, GRAPH_BATCHES * batch, steps=steps, batch_size=batch,
                                                   generator=gen, dtype=dtype, cuda_graph=True), GRAPH_BATCHES)
    return out


def cases(device: str, quick: bool = False) -> list[Case]:
    """Rows for benchmarks/run.py: the tiny model (B=8, T=8), where per-step overhead dominates. The ViT-B
    numbers (B=32, T=20) come from this script's command line, since one call takes seconds."""
    size, batch, steps = "tiny", 8, 8
    model = build(size, device)
    rows = []
    for dname, dtype in DTYPES.items():
        for provider, (fn, nb) in providers(model, batch, steps, dtype, device).items():
            rows.append(Case("generate", provider, "cpu" if device == "cpu" else "cuda", "no-grad",
                             f"{size} B={batch} T={steps} x{nb}", dname, fn))
    return rows


def test_bench_generate_tiny(benchmark):
    model = build("tiny", "cpu")
    benchmark(lambda: mage.generate(model, 8, steps=8, batch_size=8))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "base", "large"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--providers", nargs="+", default=None)
    p.add_argument("--repeat", type=int, default=1, help="timed rounds after one warm-up (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (slow CPU runs)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    model = build(args.model, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
          f"cpus, {torch.get_num_threads()} threads), torch {torch.__version__}, model {args.model}, "
          f"batch {args.batch}, steps {args.steps}", flush=True)
    runs = [(dname, name, fn, nb)
            for dname in args.dtype
            for name, (fn, nb) in providers(model, args.batch, args.steps, DTYPES[dname], args.device).items()
            if not args.providers or name in args.providers]
    if not args.no_warmup:
        for _, _, fn, _ in runs:
            fn()
    # Round-robin over the providers, so that load from other processes on a shared machine hits all alike.
    times = {(dname, name): [] for dname, name, _, _ in runs}
    for _ in range(args.repeat):
        for dname, name, fn, nb in runs:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[(dname, name)].append((time.perf_counter() - t0) / nb)
    rows = []
    for dname, name, _, _ in runs:
        t = float(np.median(times[(dname, name)]))
        line = f"{name:10s} {dname:5s} {t:9.3f} s/batch  {args.batch / t:9.3f} images/s"
        tflops = ""
        if args.model in STEP_GFLOP:
            gflop = args.batch * (STEP_GFLOP[args.model] * args.steps + DECODE_GFLOP)
            tflops = f"{gflop / t / 1e3:.3f}"
            line += f"  {tflops:>7s} TFLOP/s"
        print(line, flush=True)
        rows.append(dict(device=args.device, model=args.model, provider=name, dtype=dname, batch=args.batch,
                         steps=args.steps, s_per_batch=f"{t:.4f}", images_per_s=f"{args.batch / t:.3f}",
                         tflops=tflops))
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
