"""MAGE training-step throughput (images/s): the masked-token objective (docs/REFERENCE.md 4.7) on token ids,
forward + backward + AdamW, with mage's kernels and with the pure-PyTorch reference ops.

    python benchmarks/bench_training.py --device cuda --model base --batch 64 --steps 10 --csv training.csv

The backend is chosen once per process (MAGE_KERNELS_BACKEND), so each backend runs in a child process of
this script. Tokenization is left out (training reads a token cache); ids are random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import mage
from mage import train as T

from common import write_csv

SIZES = {"tiny": ("mage_vit_tiny", dict(depth=4, decoder_depth=2), mage.TokenizerConfig.tiny()),
         "base": ("mage_vit_base_patch16", {}, None)}


def child(args) -> dict:
    name, overrides, tok = SIZES[args.model]
    if tok is not None:
        overrides = dict(overrides, tokenizer=tok)
    model = mage.model.CONSTRUCTORS[name](**overrides).to(args.device)
    cfg = T.TrainConfig(objective="mage", batch_size=args.batch, model=name)
    module = T.TrainModule(cfg, model).to(args.device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=args.device == "cuda")
    L, K = model.config.num_tokens, model.config.codebook_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, K, (args.batch, 1, L), generator=g).to(args.device)
    rows = torch.arange(args.batch)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step(i: int) -> None:
        plan = T.plan_masks(cfg, i, L, rows, args.device)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            loss, _ = module(ids, plan)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(1 + i)
    sync()
    t = (time.perf_counter() - t0) / args.steps
    import mage_kernels

    ops = mage_kernels.build_info()["ops"]
    return dict(device=args.device, model=args.model, backend=os.environ.get("MAGE_KERNELS_BACKEND") or "default",
                resolved=ops["mask_plan"].get(args.device, ""), dtype=args.dtype, batch=args.batch,
                steps=args.steps, s_per_step=f"{t:.4f}", images_per_s=f"{args.batch / t:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=["default", "reference"],
                   help="MAGE_KERNELS_BACKEND of each child ('default': the library's choice)")
    p.add_argument("--csv", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for backend in args.backends:
        env = dict(os.environ)
        env.pop("MAGE_KERNELS_BACKEND", None)
        if backend != "default":
            env["MAGE_KERNELS_BACKEND"] = backend
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch), "--steps",
               str(args.steps), "--dtype", args.dtype, "--device", args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench_training: backend {backend} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{backend:10s} ({row['resolved']:9s}) {args.dtype}  {row['s_per_step']} s/step  "
              f"{row['images_per_s']} images/s", flush=True)
        rows.append(row)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
