"""What the checkpoint manifest (every file's SHA-256, admmq_dist/checkpoint/manifest.py) costs
the writer: CheckpointWriter timed end to end on 2 GiB shards of random int32 words, with the
manifest and without it (its hashing patched out), runs alternating.

    python benchmarks/manifest_hashing.py                       # one 2 GiB shard, 5 runs each
    python benchmarks/manifest_hashing.py --shards 3 --runs 2   # 3 x 2 GiB

Writes benchmarks/results/manifest_hashing_<N>x2gib.md. Shards before the last are hashed in a
background thread as they are written, so the time spent in ``write_manifest`` (at ``finalize``)
is the last shard's hash; the total also moves with the disk's writeback and the machine's other
work, by seconds between runs (the results file records the load average).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import admmq_dist.checkpoint.writer as writer_module  # noqa: E402
from admmq_dist.checkpoint.manifest import Digests  # noqa: E402
from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from environment import describe  # noqa: E402

GIB = 2**30


def sha256_rate() -> float:
    data = os.urandom(256 * 2**20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - start)


def write_once(out: Path, words: list[torch.Tensor], shards: int, manifest: bool) -> dict:
    saved = (writer_module.write_manifest, Digests.add, Digests.rename)
    spent = [0.0]

    def timed(*args):
        start = time.perf_counter()
        saved[0](*args)
        spent[0] += time.perf_counter() - start

    writer_module.write_manifest = timed if manifest else (lambda *args: None)
    if not manifest:
        Digests.add, Digests.rename = (lambda self, path: None), (lambda self, old, new: None)
    weight = torch.randn(64, 64)
    grid = fit_grid(weight, GridSpec(bits=4, group_size=32, symmetric=True))
    try:
        start = time.perf_counter()
        with writer_module.CheckpointWriter(out, format="compressed-tensors", bits=4,
                                            group_size=32, symmetric=True,
                                            max_shard_bytes=2 * GIB + 2**20) as writer:
            writer.add_quantized("model.layers.0.mlp.up_proj", grid.codes(weight), grid)
            for i in range(shards):  # the same words each time: the writer copies them anyway
                for j, tensor in enumerate(words):
                    writer.add_tensor(f"model.extra.{i}.{j}", tensor)
            writer.finalize(config={"model_type": "llama"}, source_dir=None, ignore=[])
        total = time.perf_counter() - start
    finally:
        writer_module.write_manifest, Digests.add, Digests.rename = saved
    shards = len(list(out.glob("*.safetensors")))
    shutil.rmtree(out)
    return {"total": total, "manifest": spent[0], "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/admmq-manifest-bench"))
    parser.add_argument("--out", help="default: benchmarks/results/manifest_hashing_<N>x2gib.md")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks/results"
                               / f"manifest_hashing_{args.shards}x2gib.md")
    rate = sha256_rate()
    per = 2 * GIB // 4 // 8
    words = [torch.randint(-2**31, 2**31 - 1, (per,), dtype=torch.int32) for _ in range(8)]
    runs = {True: [], False: []}
    load = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for manifest in (False, True):
            runs[manifest].append(write_once(args.dir / "out", words, args.shards, manifest))
            print(manifest, runs[manifest][-1], flush=True)
    load.append(os.getloadavg()[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    lines = ["# The checkpoint manifest's cost to the writer", "",
             f"`python benchmarks/manifest_hashing.py {' '.join(sys.argv[1:])}` at commit "
             f"{commit}; {describe()}; {os.cpu_count()} cores; {args.runs} runs each, "
             f"alternating; load average {load[0]:.1f} before, {load[1]:.1f} after (the machine "
             f"is shared). SHA-256 in memory on one core: {rate / 1e9:.2f} GB/s.", "",
             "| writer | shards | total (median, min-max) | of which in write_manifest |",
             "|---|---|---|---|"]
    for manifest in (False, True):
        totals = [r["total"] for r in runs[manifest]]
        hashed = [r["manifest"] for r in runs[manifest]]
        lines.append(f"| {'with' if manifest else 'without'} manifest | "
                     f"{runs[manifest][0]['shards']} x 2 GiB | {statistics.median(totals):.2f} s "
                     f"({min(totals):.2f}-{max(totals):.2f}) | "
                     + (f"{statistics.median(hashed):.2f} s ({min(hashed):.2f}-{max(hashed):.2f})"
                        if manifest else "—") + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
