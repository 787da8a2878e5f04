"""Seconds per training step on this machine: plain fp32 vs the training loop's speedups, same run.

    python -m benchmarks.train_speed --device cpu --batch-size 8 --steps 6

Variants: fp32 with the teacher run every step (the plain recipe); fp32 with
channels-last and cached teacher targets (what ``python -m train`` does by default);
the same with bf16 autocast (``--amp``). Random frames, real Lite weights; the timed
work is exactly ``train.loop._losses`` + backward + Adam step.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="lite", choices=["lite", "s", "m"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--name", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    import torch

    from train.cli import SIZES
    from train.loop import TrainConfig, _losses
    from train.models import create_model

    kw = {} if args.size == "lite" else {"teacher": "lite2"}
    model = create_model(SIZES[args.size], image_size=args.image_size, **kw).to(args.device).train()
    cfg = TrainConfig(data="", out="")
    opt = torch.optim.Adam(list(model.student.parameters()) + list(model.autoencoder.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(args.device) * 255
    with torch.no_grad():
        cached = model.teacher_features(model.normalize(rgb))
    dev = "cuda" if args.device.startswith("cuda") else "cpu"

    def seconds_per_step(amp: bool, t) -> float:
        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                loss = sum(_losses(model, rgb, gen, cfg, t).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - t0) / args.steps

    rows = {"fp32, teacher every step": seconds_per_step(False, None)}
    model.to(memory_format=torch.channels_last)
    rows["fp32, channels-last, cached teacher targets (default)"] = seconds_per_step(False, cached)
    rows["bf16 autocast (--amp), channels-last, cached teacher targets"] = seconds_per_step(True, cached)
    base = rows["fp32, teacher every step"]
    table = {k: {"seconds_per_step": v, "speedup_vs_plain_fp32": base / v} for k, v in rows.items()}
    name = args.name or f"train_speed_{args.size}_{args.device.split(':')[0]}.json"
    path = write_result(name, {"size": args.size, "image_size": args.image_size, "batch_size": args.batch_size,
                               "timed_steps": args.steps, "threads": torch.get_num_threads(), "variants": table}, args.results)
    print(json.dumps(table, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
