"""Time one DINO optimizer step (teacher + student forward, backward, AdamW, EMA) on synthetic
crops, for a few configurations; prints a Markdown table row per case.

    python bench/dino_step.py [--device cpu|cuda] [--steps 5] [--case NAME ...]

Each case runs in its own process so peak memory (RSS on CPU, allocated on CUDA) is its own.
Record results in bench/RESULTS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = {
    # The default demo config (configs/dino.yaml, configs/backbone/vit.yaml).
    "demo-vit": dict(backbone={"name": "vit", "img_size": [32, 64, 64], "patch_size": [8, 16, 16],
                               "hidden_size": 192, "mlp_dim": 768, "num_layers": 2,
                               "num_heads": 3},
                     global_size=[32, 64, 64], local_size=[16, 32, 32], n_local=4, batch=4,
                     out_dim=1024, hidden_dim=512, bottleneck_dim=128),
    # Like the ViT-S row of ../shared/docs/cpu_costs.md (0.35 s/sample at batch 4 there).
    "vit-s-96": dict(backbone={"name": "vit", "img_size": [32, 96, 96], "patch_size": 16,
                               "hidden_size": 384, "mlp_dim": 1536, "num_layers": 6,
                               "num_heads": 6},
                     global_size=[32, 96, 96], local_size=[16, 48, 48], n_local=4, batch=4,
                     out_dim=65536, hidden_dim=2048, bottleneck_dim=256),
    # UNet3D (SuPreM layout) at demo sizes.
    "demo-unet3d": dict(backbone={"name": "unet3d"}, global_size=[32, 64, 64],
                        local_size=[16, 32, 32], n_local=4, batch=2, out_dim=1024,
                        hidden_dim=512, bottleneck_dim=128),
    # The OAI reference (preset=oai): 2x 40x224x224 + 2x 40x128x128, UNet3D, batch 1 here.
    "oai-unet3d": dict(backbone={"name": "unet3d"}, global_size=[40, 224, 224],
                       local_size=[40, 128, 128], n_local=2, batch=1, out_dim=65536,
                       hidden_dim=2048, bottleneck_dim=256),
}


def run_case(name: str, device: str, steps: int) -> dict:
    from lightly.models.utils import update_momentum

    from medssl.models.dino import DINO

    case = CASES[name]
    module = DINO(case["backbone"], out_dim=case["out_dim"], hidden_dim=case["hidden_dim"],
                  bottleneck_dim=case["bottleneck_dim"], head_batch_norm=True).to(device)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    b = case["batch"]
    crops = [torch.rand(b, 1, *case["global_size"], device=device) for _ in range(2)]
    crops += [torch.rand(b, 1, *case["local_size"], device=device)
              for _ in range(case["n_local"])]

    def step() -> None:
        teacher_out, _ = module.forward_teacher(crops[:2])
        loss = module.criterion(teacher_out, module(crops), teacher_temp=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_momentum(module.student_backbone, module.teacher_backbone, 0.996)
        update_momentum(module.student_head, module.teacher_head, 0.996)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_gb = (torch.cuda.max_memory_allocated() if device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    return {"case": name, "device": device, "batch": b, "s_per_step": round(seconds, 3),
            "s_per_sample": round(seconds / b, 3), "peak_gb": round(peak_gb, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--case", nargs="*", default=[c for c in CASES if c != "oai-unet3d"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.device, args.steps)))
        return
    print("| case | device | batch | s/step | s/sample | peak GB | threads |")
    print("|---|---|---|---|---|---|---|")
    for name in args.case:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device,
                              "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['case']} | {r['device']} | {r['batch']} | {r['s_per_step']} | "
              f"{r['s_per_sample']} | {r['peak_gb']} | {r['threads']} |", flush=True)


if __name__ == "__main__":
    main()
