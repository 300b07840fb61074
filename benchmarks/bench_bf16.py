"""bf16 autocast against fp32 on the same weights, end to end: what it gains (time) and what it risks.

    python benchmarks/bench_bf16.py --model tiny --batch 8 --steps 8
    python benchmarks/bench_bf16.py --weights out/mage/model.safetensors --batch 16 --steps 8
    python benchmarks/bench_bf16.py --gemm-only         # only the GEMM rates (fast on any machine)

Per model, round-robin in one process so machine load hits both dtypes alike:
  gemm      fp32 and bf16 matmul rate at ViT-B's MLP shape ([512, 768] x [768, 3072]): whether this CPU
            multiplies bf16 natively (AVX-512 BF16 / AMX) or emulates it;
  sample    `mage.generate` (docs/REFERENCE.md 4.10), seconds per batch;
  agree     token agreement with fp32: the final tokens of the same seeded sampling run, and the top-1
            prediction at masked positions of one forward from the same half-masked input;
  train     one MAGE training step (forward, backward, AdamW; docs/REFERENCE.md 4.7), seconds, and how
            the bf16 loss and gradient differ from fp32 on the same batch and masks.
Writes one CSV row per (model, measure, dtype) with --csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cpu_roofline  # noqa: E402
from common import write_csv  # noqa: E402

import mage  # noqa: E402
from mage import sampler  # noqa: E402
from mage import train as T  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def round_robin(fns: dict, repeat: int) -> dict:
    """Median seconds per call of each fn, one call of each per round after one warm-up call."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_rates(repeat: int) -> dict:
    """GFLOP/s of one [512, 768] x [768, 3072] matmul in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 768, generator=g), torch.randn(768, 3072, generator=g)
    ab, bb = a.bfloat16(), b.bfloat16()
    secs = round_robin({"fp32": lambda: a @ b, "bf16": lambda: ab @ bb}, repeat)
    return {k: 2 * 512 * 768 * 3072 / s / 1e9 for k, s in secs.items()}


def build(args) -> tuple[str, mage.MAGE]:
    if args.weights:
        return os.path.basename(os.path.dirname(os.path.abspath(args.weights))) + " (trained)", mage.load(args.weights)
    torch.manual_seed(0)
    if args.model == "tiny":
        return "tiny (random)", mage.mage_vit_tiny(depth=4, decoder_depth=2, tokenizer=mage.TokenizerConfig.tiny())
    return "base (random)", mage.mage_vit_base_patch16()


@torch.no_grad()
def final_tokens(model: mage.MAGE, batch: int, steps: int, dtype, seed: int) -> torch.Tensor:
    c = model.config
    ids = torch.full((batch, c.num_tokens), c.mask_id, dtype=torch.long)
    with sampler._autocast(ids.device, dtype):
        return sampler.decode_tokens(model, ids, steps=steps, choice_temperature=6.0,
                                     temperature=1.0, generator=torch.Generator().manual_seed(seed),
                                     fused_head=True, reference_ties=False)


@torch.no_grad()
def top1(model: mage.MAGE, ids: torch.Tensor, unknown: torch.Tensor, dtype) -> torch.Tensor:
    K = model.config.codebook_size
    with sampler._autocast(ids.device, dtype):
        logits = model(ids, mask=unknown)[:, 1:, :K].float()
    return logits.argmax(-1)[unknown]


def train_step_fns(model: mage.MAGE, batch: int) -> tuple[dict, dict]:
    """{dtype: one training step} on private copies of the model, and the bf16-vs-fp32 differences of the
    loss and the gradient on one identical batch and mask plan."""
    cfg = T.TrainConfig(objective="mage", batch_size=batch)  # its masking ratios; the model is ours
    L, K = model.config.num_tokens, model.config.codebook_size
    ids = torch.randint(0, K, (batch, 1, L), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(batch)
    modules = {d: T.TrainModule(cfg, copy.deepcopy(model)).train() for d in DTYPES}

    def loss_and_grad(d: str, step: int) -> tuple[float, torch.Tensor]:
        module = modules[d]
        module.zero_grad(set_to_none=True)
        torch.manual_seed(step)  # the same dropout draws in both dtypes
        with torch.autocast("cpu", dtype=DTYPES[d], enabled=DTYPES[d] is not None):
            loss, _ = module(ids, T.plan_masks(cfg, step, L, rows, "cpu"))
        loss.backward()
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        return loss.item(), torch.cat(grads)

    (l32, g32), (l16, g16) = loss_and_grad("fp32", 0), loss_and_grad("bf16", 0)
    diff = {"loss_fp32": l32, "loss_bf16": l16, "loss_rel_diff": abs(l16 - l32) / abs(l32),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0)),
            "grad_rel_err": float((g16.double() - g32.double()).norm() / g32.double().norm())}
    opts = {d: torch.optim.AdamW(m.parameters(), lr=1e-4) for d, m in modules.items()}
    counter = {"step": 1}

    def step(d: str):
        def run():
            loss_and_grad(d, counter["step"])
            opts[d].step()
            counter["step"] += 1
        return run

    return {d: step(d) for d in DTYPES}, diff


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "base"], help="random weights of this size")
    p.add_argument("--weights", default=None, help="a trained model file (MAGE.save / mage train output)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="sampling steps")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4, help="sampling runs compared for token agreement")
    p.add_argument("--gemm-only", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    isa = cpu_roofline.isa()
    head = dict(isa=isa, threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 1), torch=torch.__version__)
    print(f"cpu {cpu_roofline.cpu_model()}, isa {isa}, {head['threads']} threads, load {head['load']}", flush=True)
    rows = []
    rates = gemm_rates(args.repeat)
    for d, r in rates.items():
        rows.append(dict(head, model="-", measure="gemm GFLOP/s", dtype=d, value=f"{r:.2f}"))
    print(f"gemm [512,768]x[768,3072]: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.2f} GFLOP/s "
          f"(bf16/fp32 {rates['bf16'] / rates['fp32']:.3f})", flush=True)
    if not args.gemm_only:
        name, model = build(args)
        model.eval()
        B, S = args.batch, args.steps
        gen = {d: torch.Generator().manual_seed(0) for d in DTYPES}
        secs = round_robin({d: (lambda d=d: mage.generate(model, B, steps=S, batch_size=B, generator=gen[d],
                                                          dtype=DTYPES[d])) for d in DTYPES}, args.repeat)
        for d, s in secs.items():
            rows.append(dict(head, model=f"{name} B={B} T={S}", measure="sample s/batch", dtype=d, value=f"{s:.4f}"))
        same = total = 0
        for seed in range(args.seeds):
            a, b = final_tokens(model, B, S, None, seed), final_tokens(model, B, S, torch.bfloat16, seed)
            same, total = same + int((a == b).sum()), total + a.numel()
        ids = final_tokens(model, B, S, None, 0)
        unknown = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        ids = ids.masked_fill(unknown, model.config.mask_id)
        pred = (top1(model, ids, unknown, None) == top1(model, ids, unknown, torch.bfloat16)).double().mean().item()
        final = same / total
        rows.append(dict(head, model=f"{name} B={B} T={S}", measure="final-token agreement", dtype="bf16",
                         value=f"{final:.4f}"))
        rows.append(dict(head, model=f"{name} B={B}", measure="top-1 agreement (half masked)", dtype="bf16",
                         value=f"{pred:.4f}"))
        steps, diff = train_step_fns(model, B)
        tsecs = round_robin(steps, args.repeat)
        for d, s in tsecs.items():
            rows.append(dict(head, model=f"{name} B={B}", measure="train s/step", dtype=d, value=f"{s:.4f}"))
        for k in ("loss_rel_diff", "grad_cosine", "grad_rel_err"):
            rows.append(dict(head, model=f"{name} B={B}", measure=k, dtype="bf16", value=f"{diff[k]:.6f}"))
        print(f"{name}: sample B={B} T={S} fp32 {secs['fp32']:.3f} s, bf16 {secs['bf16']:.3f} s "
              f"(bf16 {secs['fp32'] / secs['bf16']:.2f}x fp32's speed); final tokens agree {100 * final:.1f}% "
              f"({args.seeds} seeds), top-1 at masked positions {100 * pred:.1f}%", flush=True)
        print(f"{name}: train step B={B} fp32 {tsecs['fp32']:.3f} s, bf16 {tsecs['bf16']:.3f} s "
              f"(bf16 {tsecs['fp32'] / tsecs['bf16']:.2f}x); loss {diff['loss_fp32']:.4f} vs {diff['loss_bf16']:.4f} "
              f"(rel {diff['loss_rel_diff']:.2e}), gradient cosine {diff['grad_cosine']:.5f}, "
              f"rel err {diff['grad_rel_err']:.3e}", flush=True)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
