"""The yardstick of issue 11: a plain from-scratch ResNet-18 loop on a synthetic product table's photos, outside
mmcat (no loader, no fusion head, no artifact), to tell "these photos are hard" from "mmcat's recipe learns them
badly" (README "Both halves learn").

Every photo is decoded once (OpenCV), centre-cropped square and resized to ``--size``; an 80/20 random split of the
products; horizontal flips only; AdamW with a one-cycle schedule; test accuracy printed after each epoch.

    python benchmarks/plain_image_loop.py --raw DIR/raw [--size 96] [--epochs 15] [--lr 1e-3]

``DIR/raw`` is what ``mmcat synth`` writes (``products.csv`` with ``image`` and ``category`` columns).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from mmcat.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def load_photos(raw: Path, size: int):
    """(uint8 [N, size, size, 3] RGB, int labels [N], label names) for every row of ``raw/products.csv``."""
    rows = list(csv.DictReader(open(raw / "products.csv", newline="")))
    names = sorted({r["category"] for r in rows})
    photos = []
    for r in rows:
        img = cv2.imread(str(raw / r["image"]))
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        photos.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1])
    return np.stack(photos), np.array([names.index(r["category"]) for r in rows]), names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # numpy's global stream: the figures in the README were made with it
    x, y, names = load_photos(args.raw, args.size)
    order = np.random.permutation(len(y))
    train, test = order[:int(0.8 * len(y))], order[int(0.8 * len(y)):]
    mean = 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def tensor(batch: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() - mean) / std

    net = torchvision.models.resnet18(num_classes=len(names))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = len(train) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm, losses = np.random.permutation(train), []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            batch = x[idx].copy()
            flip = np.random.rand(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            loss = torch.nn.functional.cross_entropy(net(tensor(batch)), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(tensor(x[test[i:i + 128]])).argmax(1) for i in range(0, len(test), 128)])
        print(f"epoch {epoch + 1}: train loss {np.mean(losses):.3f}, test accuracy "
              f"{(pred.numpy() == y[test]).mean():.3f} ({len(test)} photos), {time.perf_counter() - start:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
