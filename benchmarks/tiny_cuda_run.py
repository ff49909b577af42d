"""A tiny Llama quantized end to end on CUDA and on the CPU from the same calibration windows:
the GPU path runs (capture, factorizations, ADMM-Q, writing) and its loss stays near the CPU's
(float reductions differ between devices, so bytes need not match). Part of gpu_check.sh."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from admmq_dist.recipe import Recipe, override  # noqa: E402
from admmq_dist.run.job import quantize_model  # noqa: E402
from tiny import tiny_model_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    recipe = override(Recipe(), {"grid": {"bits": 3, "group_size": 32},
                                 "calibration": {"dataset": None, "num_samples": 8,
                                                 "seq_len": 64, "batch_size": 4}})
    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_model_dir(Path(tmp) / "src", "llama", hidden_size=128, intermediate_size=256)
        runs = {dev: quantize_model(str(src), Path(tmp) / dev, recipe, device=torch.device(dev),
                                    progress=False) for dev in ("cuda", "cpu")}
    line = {dev: {k: runs[dev][k] for k in ("mean_loss", "layers", "factorizations")}
            | {"seconds": runs[dev]["seconds"]["total"]} for dev in runs}
    line["loss_ratio_cuda_cpu"] = runs["cuda"]["mean_loss"] / runs["cpu"]["mean_loss"]
    print(json.dumps(line))
    (args.out / "tiny_cuda_run.json").write_text(json.dumps(line, indent=1) + "\n")
    return 0 if abs(line["loss_ratio_cuda_cpu"] - 1) < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
