"""Multi-crop cost: samples per second per core of ``MultiCropd`` variants, timed interleaved.

Each round times every variant once, in turn, on one thread, and the report is the median
over rounds of each variant's rate relative to the first variant: interleaving makes the
ratios robust to other load on a shared machine (absolute rates are not).

    python bench/multicrop.py --case demo --rounds 5
    python bench/multicrop.py --case oai --rounds 3

Variants: the default views (``augment:`` keys of configs/dino.yaml), without rotation (the
crop is then one separable resample), and without blur.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from medssl.data.augment import MultiCropd

CASES: dict[str, dict[str, Any]] = {
    "oai": {"volume": (40, 224, 224), "global_size": (40, 224, 224),
            "local_size": (40, 128, 128), "n_crops": 4, "reps": 4},
    "demo": {"volume": (32, 64, 64), "global_size": (32, 64, 64), "local_size": (16, 32, 32),
             "n_crops": 6, "reps": 30},
    "medmnist": {"volume": (32, 32, 32), "global_size": (32, 32, 32),
                 "local_size": (16, 16, 16), "n_crops": 6, "reps": 60},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-rotation": {"rotate_prob": 0.0},
    "no-blur": {"global_blur_prob": (0.0, 0.0), "local_blur_prob": 0.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="demo")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = CASES[args.case]
    volume = torch.rand((1, *case["volume"]), generator=torch.Generator().manual_seed(0))
    transforms = {}
    for name, options in VARIANTS.items():
        transforms[name] = MultiCropd("image", global_size=case["global_size"],
                                      local_size=case["local_size"], global_scale=(0.4, 1.0),
                                      local_scale=(0.05, 0.4), n_crops=case["n_crops"],
                                      **options)
        transforms[name].set_random_state(seed=0)
        transforms[name]({"image": volume})  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in transforms}
    for _ in range(args.rounds):
        for name, transform in transforms.items():
            start = time.perf_counter()
            for _ in range(case["reps"]):
                transform({"image": volume})
            rates[name].append(case["reps"] / (time.perf_counter() - start))
    first = next(iter(rates))
    for name, values in rates.items():
        ratio = statistics.median(a / b for a, b in zip(values, rates[first], strict=True))
        print(f"{args.case:8s} {name:12s} samples/s/core median {statistics.median(values):7.2f} "
              f"(max {max(values):7.2f})  vs {first} x{ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
