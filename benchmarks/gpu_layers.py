"""ADMM-Q against act-order GPTQ on Llama-7B-shaped layers, both on the GPU.

Synthetic Hessians with outlier input channels (real ones need the model, which the GPU machine
cannot download). Prints loss and time ratios; writes a markdown table to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from admmq_dist.quant.grid import GridSpec, fit_grid  # noqa: E402
from admmq_dist.quant.solvers import admmq, gptq, local_search  # noqa: E402
from conftest import synthetic_layer  # noqa: E402

SHAPES = [("q_proj-like 4096->4096", 4096, 4096), ("up_proj-like 4096->11008", 11008, 4096),
          ("down_proj-like 11008->4096", 4096, 11008)]


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    lines = ["| layer | bits | gptq_act loss | admmq/gptq_act | admmq+ls/gptq_act | gptq_act s "
             "| admmq s | admmq+ls s | iterations |", "|---|---|---|---|---|---|---|---|---|"]
    records = []
    for name, rows, cols in SHAPES:
        # Build the synthetic layer on the CPU with the test fixture's generator, then move it.
        w, h, _ = synthetic_layer(rows, cols, 2 * cols, seed=0, outliers=cols // 256)
        w, h = w.to(dev), h.to(dev)
        for bits in args.bits:
            grid = fit_grid(w, GridSpec(bits=bits, group_size=128))
            gptq(w, h, grid)  # warm-up: kernels, cuSOLVER handles
            g, tg = timed(lambda: gptq(w, h, grid))
            a, ta = timed(lambda: admmq(w, h, grid))
            ls, tl = timed(lambda: local_search(w, h, grid, a.codes, sweeps=2))
            rec = {"layer": name, "bits": bits, "gptq_act_loss": g.loss,
                   "admmq_over_gptq_act": a.loss / g.loss, "admmq_ls_over_gptq_act": ls.loss / g.loss,
                   "gptq_act_s": tg, "admmq_s": ta, "admmq_ls_s": ta + tl, "iterations": a.iterations}
            records.append(rec)
            lines.append(f"| {name} | {bits} | {g.loss:.5f} | {a.loss / g.loss:.3f} | "
                         f"{ls.loss / g.loss:.3f} | {tg:.2f} | {ta:.2f} | {ta + tl:.2f} | "
                         f"{a.iterations} |")
            print(lines[-1], flush=True)
    total = {k: sum(r[k] for r in records) for k in ("gptq_act_s", "admmq_s", "admmq_ls_s")}
    lines.append("")
    lines.append(f"time over act-order GPTQ: ADMM-Q {total['admmq_s'] / total['gptq_act_s']:.2f}x, "
                 f"with local search {total['admmq_ls_s'] / total['gptq_act_s']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"# GPU layer check ({torch.cuda.get_device_name(dev)})\n\n{text}\n")
    print(json.dumps({"records": records, "totals": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
