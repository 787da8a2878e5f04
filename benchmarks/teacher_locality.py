"""How well a teacher configuration localizes defects, before spending a training run on it.

    python -m benchmarks.teacher_locality --data ../shared/data/mvtec_ad/bottle \\
        --configs 2,3@8 2,3@4 1,2,3@4 1,2@4

Each config is ``STAGES@STRIDE``: the EfficientNet-Lite stages the teacher uses and the
map stride of the real-time model (8 = 32x32 map at 256 px, 4 = 64x64). The student
learns to predict exactly these (z-scored) teacher features, so a nearest-neighbour
score on them (PatchCore-style: distance of each test location to a random 16k-vector
bank of training locations) is a cheap proxy for the localization the trained model
can reach; it needs no training, about a minute per config on 2 CPU cores. Standard
metrics on DATA/test.
"""
from __future__ import annotations

import argparse
import logging
import time

from benchmarks.common import write_result


def parse_config(text: str) -> tuple[tuple[int, ...], int]:
    stages, _, stride = text.partition("@")
    return tuple(int(s) for s in stages.split(",")), int(stride or 8)


def knn_scores(model, train_frames, test_frames, bank_size: int, seed: int):
    """Nearest-neighbour distance maps [N,1,h,w] of the test frames to the training locations."""
    import torch

    from train.models.efficientad_train import teacher_cache, teacher_statistics

    teacher_statistics(model, train_frames, "cpu")
    tr, te = (teacher_cache(model, frames, "cpu", budget_bytes=2 ** 62) for frames in (train_frames, test_frames))
    c, (h, w) = tr.shape[1], tr.shape[2:]
    bank = tr.permute(0, 2, 3, 1).reshape(-1, c)
    bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:bank_size]]
    q = te.permute(0, 2, 3, 1).reshape(-1, c)
    d = torch.cat([torch.cdist(q[i:i + 8192], bank).min(1).values for i in range(0, len(q), 8192)])
    return d.view(len(test_frames), 1, h, w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--configs", nargs="+", default=["2,3@8", "2,3@4", "1,2,3@4", "1,2@4"])
    p.add_argument("--teacher", default="lite2", choices=["lite0", "lite2"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--bank-size", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import torch.nn.functional as F

    from calibration.metrics import evaluate
    from runtime.dataset import open_dataset, read_mask
    from train.data import load_frames
    from train.models import create_model

    ds = open_dataset(args.data)
    size = args.image_size
    train_frames = load_frames(list(ds.train), size, "train images")
    test_frames = load_frames([s.path for s in ds.test], size, "test images")
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, size, size) for s in ds.test])
    rows = []
    for text in args.configs:
        stages, stride = parse_config(text)
        t0 = time.time()
        model = create_model("efficientad_lite", image_size=size, teacher=args.teacher, teacher_out_indices=stages,
                             student_stride=stride).eval()
        d = knn_scores(model, train_frames, test_frames, args.bank_size, args.seed)
        maps = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
        sc = evaluate(labels, d.amax(dim=(1, 2, 3)).numpy(), masks, maps)
        row = {"config": text, "stages": list(stages), "stride": stride, "grid": list(model.grid),
               "channels": model.channels, "image_auroc": sc.image_auroc, "pixel_auroc": sc.pixel_auroc,
               "aupro": sc.aupro, "seconds": time.time() - t0}
        logging.info("%s", row)
        rows.append(row)
    name = args.name or f"teacher_locality_{ds.root.name}_{args.teacher}.json"
    path = write_result(name, {"data": str(args.data), "teacher": args.teacher, "image_size": size,
                               "bank_size": args.bank_size, "rows": rows}, args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
