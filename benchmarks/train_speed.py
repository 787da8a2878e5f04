"""Seconds per training step on this machine: plain fp32 vs the training loop's speedups, same run.

    python -m benchmarks.train_speed --device cpu --batch-size 8 --steps 6

Variants: the paper's losses written out plainly (full student output for every
input, ``torch.quantile`` for the hard loss), fp32, teacher run every step: the
baseline; then ``train.models.efficientad_train._losses`` (student head only for the half each input
needs, hard loss through ``topk``, fused MSE) with the teacher every step; with
channels-last and cached teacher targets (what ``python -m train`` does by default);
the same with bf16 autocast (``--amp``). Random frames, real Lite weights; each timed
step is losses + backward + Adam step.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import write_result
from train.cli import add_model_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    add_model_options(p)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--name", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    import torch

    from train.cli import SIZES, model_kwargs
    from train.data import color_jitter, penalty_images
    from train.loop import TrainConfig
    from train.models import create_model
    from train.models.efficientad_train import _losses

    kw = model_kwargs(args)
    model = create_model(SIZES[args.size], image_size=args.image_size, **kw).to(args.device).train()
    cfg = TrainConfig(data="", out="")
    opt = torch.optim.Adam(list(model.student.parameters()) + list(model.autoencoder.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(args.device) * 255
    with torch.no_grad():
        cached = model.teacher_features(model.normalize(rgb))
    dev = "cuda" if args.device.startswith("cuda") else "cpu"

    def plain_losses(model, rgb, gen, cfg, t=None):
        """The baseline: EfficientAD's four losses transcribed directly (same inputs as _losses)."""
        c, n = model.channels, rgb.shape[0]
        x = model.normalize(rgb)
        t = model.teacher_features(x) if t is None else t
        xa = model.normalize(color_jitter(rgb, gen))
        xp = model.normalize(penalty_images(rgb, gen))
        s_all = model.student(torch.cat([x, xa, xp]))
        d = (t - s_all[:n, :c].float()) ** 2
        hard = torch.mean(d[d >= torch.quantile(d.flatten()[: 2 ** 24], cfg.hard_quantile)])
        a = model.autoencoder(xa).float()
        return {"hard": hard, "penalty": torch.mean(s_all[2 * n:, :c].float() ** 2),
                "ae": torch.mean((model.teacher_features(xa) - a) ** 2),
                "st_ae": torch.mean((a - s_all[n:2 * n, c:].float()) ** 2)}

    def seconds_per_step(amp: bool, t, losses_fn=_losses) -> float:
        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                loss = sum(losses_fn(model, rgb, gen, cfg, t).values())
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

    base_name = "plain losses, fp32, teacher every step"
    rows = {base_name: seconds_per_step(False, None, plain_losses),
            "edgead losses, fp32, teacher every step": seconds_per_step(False, None)}
    model.to(memory_format=torch.channels_last)
    rows["fp32, channels-last, cached teacher targets (default)"] = seconds_per_step(False, cached)
    rows["bf16 autocast (--amp), channels-last, cached teacher targets, plain losses"] = \
        seconds_per_step(True, cached, plain_losses)
    rows["bf16 autocast (--amp), channels-last, cached teacher targets"] = seconds_per_step(True, cached)
    base = rows[base_name]
    table = {k: {"seconds_per_step": v, "speedup_vs_plain": base / v} for k, v in rows.items()}
    name = args.name or f"train_speed_{args.size}_{args.device.split(':')[0]}.json"
    path = write_result(name, {"size": args.size, "image_size": args.image_size, "batch_size": args.batch_size,
                               "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                               "timed_steps": args.steps, "threads": torch.get_num_threads(), "variants": table}, args.results)
    print(json.dumps(table, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
