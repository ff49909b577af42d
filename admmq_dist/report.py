"""The run report: one self-contained HTML page (plots inlined as PNG data URIs) from the
per-layer records of ``report.jsonl`` and the run summary.

Plots: relative loss across depth per module type (and, with ``report.compare``, ADMM-Q's loss
over GPTQ's on the same Hessian), ADMM-Q's primal residual and penalty per iteration, the time
breakdown, and for the schedules with rounds the codes changed (and ρ) per round. Figures are
built with ``matplotlib.figure.Figure`` directly, not pyplot, so rendering touches no global
backend state; matplotlib is imported only when a report is drawn, so writing a checkpoint does
not need it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PHASES = ("load", "forward", "solve", "write", "commit")


def module_type(layer: str) -> str:
    """``model.layers.3.mlp.experts.7.w1`` -> ``mlp.experts.w1``: the layer's name without the
    block prefix and with expert numbers dropped, so one line per kind of linear."""
    parts = layer.split(".")
    # The block index is the first numeric part; everything after it names the module.
    for i, part in enumerate(parts):
        if part.isdigit():
            parts = parts[i + 1:]
            break
    return ".".join(p for p in parts if not p.isdigit())


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _loss_plot(records: list[dict]) -> Figure | None:
    solved = [r for r in records if r.get("loss") is not None]
    if not solved:
        return None
    compare = any(r.get("compare", {}).get("gptq") for r in solved)
    fig = _figure((10, 4.2 if not compare else 7.6))
    axes = fig.subplots(2 if compare else 1, 1, squeeze=False)[:, 0]
    by_type: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ratio: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in solved:
        by_type[module_type(r["layer"])][r["block"]].append(r["loss"])
        gptq = r.get("compare", {}).get("gptq")
        if gptq:
            ratio[module_type(r["layer"])][r["block"]].append(r["loss"] / gptq)
    for kind, blocks in sorted(by_type.items()):
        xs = sorted(blocks)
        axes[0].plot(xs, [sum(blocks[x]) / len(blocks[x]) for x in xs], marker="o", ms=3,
                     label=kind)
    axes[0].set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("block")
    axes[0].set_ylabel("relative loss tr(ΔHΔᵀ)/tr(WHWᵀ)")
    axes[0].set_title("ADMM-Q loss across depth, per module type (experts averaged)")
    axes[0].legend(fontsize=7, ncol=4)
    axes[0].grid(alpha=0.3)
    if compare:
        for kind, blocks in sorted(ratio.items()):
            xs = sorted(blocks)
            axes[1].plot(xs, [sum(blocks[x]) / len(blocks[x]) for x in xs], marker="o", ms=3,
                         label=kind)
        axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
        axes[1].set_xlabel("block")
        axes[1].set_ylabel("ADMM-Q loss / GPTQ loss")
        axes[1].set_title("ADMM-Q against GPTQ on the same Hessian (below 1: ADMM-Q better)")
        axes[1].legend(fontsize=7, ncol=4)
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _convergence_plot(records: list[dict], max_curves: int = 10) -> Figure | None:
    curves = [r for r in records if r.get("residual")]
    if not curves:
        return None
    # An even spread over depth: first, last and the layers between.
    step = max(1, math.ceil(len(curves) / max_curves))
    chosen = curves[::step][: max_curves - 1] + ([curves[-1]] if len(curves) > 1 else [])
    fig = _figure((10, 4.2))
    res_ax, rho_ax = fig.subplots(1, 2)
    for r in chosen:
        its = range(1, len(r["residual"]) + 1)
        res_ax.plot(its, [max(v, 1e-12) for v in r["residual"]], lw=1, label=r["layer"])
        rho_ax.plot(range(1, len(r["rho"]) + 1), r["rho"], lw=1)
    res_ax.set_yscale("log")
    res_ax.set_xlabel("iteration")
    res_ax.set_ylabel("‖W − Z‖ / ‖W0‖")
    res_ax.set_title("ADMM-Q primal residual")
    res_ax.legend(fontsize=6)
    res_ax.grid(alpha=0.3)
    rho_ax.set_yscale("log")
    rho_ax.set_xlabel("iteration")
    rho_ax.set_ylabel("ρ")
    rho_ax.set_title("penalty schedule (stops where a layer converged)")
    rho_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _time_plot(records: list[dict], summary: dict) -> Figure | None:
    seconds = summary.get("seconds", {})
    phases = [(p, seconds[p]) for p in PHASES if p in seconds]
    if not phases:
        return None
    fig = _figure((10, 3.6))
    phase_ax, type_ax = fig.subplots(1, 2)
    phase_ax.barh([p for p, _ in phases], [s for _, s in phases], color="tab:blue")
    phase_ax.invert_yaxis()
    phase_ax.set_xlabel("seconds (driver wall time)")
    phase_ax.set_title("time per phase")
    per_type: dict[str, float] = defaultdict(float)
    for r in records:
        per_type[module_type(r["layer"])] += r.get("seconds") or 0.0
    kinds = sorted(per_type, key=per_type.get, reverse=True)
    type_ax.barh(kinds, [per_type[k] for k in kinds], color="tab:orange")
    type_ax.invert_yaxis()
    type_ax.set_xlabel("solver seconds (summed over workers)")
    type_ax.set_title("solver time per module type")
    fig.tight_layout()
    return fig


def _rounds_plot(summary: dict) -> Figure | None:
    rounds = summary.get("rounds")
    if not rounds:
        return None
    residual_rounds = [(x, r) for x, r in enumerate(rounds) if "primal_residual" in r]
    fig = _figure((15 if residual_rounds else 10, 3.4))
    changed_ax, loss_ax, *more = fig.subplots(1, 3 if residual_rounds else 2)
    # Rounds are numbered, and the coordinated schedule's polish comes last by name.
    xs = list(range(len(rounds)))
    labels = [str(r["round"]) for r in rounds]
    changed_ax.plot(xs, [max(r["changed"], 1e-6) for r in rounds], marker="o")
    changed_ax.set_yscale("log")
    changed_ax.set_ylabel("fraction of codes changed")
    title = f"{summary.get('schedule', 'depth-parallel')} rounds: codes changed"
    with_rho = [(x, r["rho"]) for x, r in zip(xs, rounds) if "rho" in r]
    if with_rho:  # the coordinated schedule's one penalty, advanced per round
        rho_ax = changed_ax.twinx()
        rho_ax.plot(*zip(*with_rho), marker="s", color="tab:red", ls="--")
        rho_ax.set_yscale("log")
        rho_ax.set_ylabel("ρ (red)")
        title += " and ρ"
    changed_ax.set_title(title)
    loss_ax.plot(xs, [r["mean_loss"] for r in rounds], marker="o", color="tab:green")
    loss_ax.set_ylabel("mean relative loss")
    loss_ax.set_title("mean layer loss per round")
    if residual_rounds:  # what the coordinator's penalty rule reads
        for key, label in (("primal_residual", "primal ‖W − Z‖"),
                           ("dual_residual", "dual ρ‖Z − Z_prev‖")):
            more[0].plot([x for x, _ in residual_rounds],
                         [max(r[key], 1e-12) for _, r in residual_rounds], marker="o",
                         label=label)
        more[0].set_yscale("log")
        more[0].set_ylabel("relative to ‖W0‖ (model RMS)")
        more[0].set_title("residuals at each round's end")
        more[0].legend(fontsize=7)
    for ax in (changed_ax, loss_ax, *more):
        ax.set_xticks(xs, labels)
        ax.set_xlabel("round")
    fig.tight_layout()
    return fig


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_rows(summary: dict) -> str:
    """The summary table's rows: settings, results, planned memory, bytes moved, faults,
    seconds."""
    keys = ("model", "format", "bits", "group_size", "symmetric", "method", "layers",
            "mean_loss", "workers", "resumed_blocks", "peak_memory_bytes", "device")
    summary_rows = "".join(f"<tr><th>{k}</th><td>{_fmt(summary.get(k))}</td></tr>"
                           for k in keys if k in summary)
    planned = summary.get("memory_plan")
    if planned:
        summary_rows += (f"<tr><th>planned peak memory</th><td>"
                         f"{planned['peak_bytes'] / 2**30:.2f} GiB "
                         f"({html.escape(planned['worst'])})</td></tr>")
    for kind, count in summary.get("bytes_moved", {}).get("total", {}).items():
        summary_rows += f"<tr><th>moved: {html.escape(kind)}</th><td>{count / 2**20:.1f} MiB</td></tr>"
    # Every lost worker, and what the run redid for it.
    for k, fault in enumerate(summary.get("faults", []), 1):
        summary_rows += (f"<tr><th>fault {k}</th><td>{html.escape(fault['where'])}: "
                         f"{html.escape(fault['error'])}; workers rebuilt "
                         f"{fault['restarted_workers']}; redone: "
                         f"{html.escape(fault['redone'])}</td></tr>")
    seconds = summary.get("seconds", {})
    summary_rows += "".join(f"<tr><th>{k} s</th><td>{_fmt(float(v))}</td></tr>"
                            for k, v in seconds.items())
    return summary_rows


def render_html(records: list[dict], summary: dict, recipe_yaml: str = "") -> str:
    """The report page for ``records`` (report.jsonl rows) and ``summary`` (the run summary)."""
    figures = [("Loss across depth", _loss_plot(records)),
               ("ADMM-Q convergence", _convergence_plot(records)),
               ("Time", _time_plot(records, summary)),
               ("Rounds", _rounds_plot(summary))]
    sections = []
    for title, fig in figures:
        if fig is not None:
            slug = re.sub(r"[^a-z]+", "-", title.lower()).strip("-")
            sections.append(f'<h2>{html.escape(title)}</h2>\n<img class="plot" id="{slug}" '
                            f'alt="{html.escape(title)}" src="{_png(fig)}">')
    summary_rows = _summary_rows(summary)
    compare = any("compare" in r for r in records)
    head = ["layer", "method", "shape", "loss"] + (["gptq", "rtn", "vs gptq"] if compare else []) \
        + ["iterations", "seconds", "calibration", "tokens"]
    rows = []
    for r in records:
        cells = [r["layer"], r.get("method"), "×".join(map(str, r.get("shape", []))), r.get("loss")]
        if compare:
            base = r.get("compare", {})
            gptq = base.get("gptq")
            ratio = r["loss"] / gptq if gptq and r.get("loss") is not None else None
            cells += [gptq, base.get("rtn"), ratio]
        cells += [r.get("iterations"), r.get("seconds"), r.get("calibration"), r.get("tokens")]
        rows.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    table = ("<table class='layers'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
             + "</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>")
    title = html.escape(f"admmq-dist report: {summary.get('model', '')}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; }}
table.layers td {{ font-family: monospace; }}
img.plot {{ max-width: 100%; display: block; margin: 1em 0; }}
pre {{ background: #f4f4f4; padding: 1em; }}
</style></head><body>
<h1>{title}</h1>
<table class="summary">{summary_rows}</table>
{chr(10).join(sections)}
<h2>Per layer</h2>
<details open><summary>{len(records)} layers</summary>{table}</details>
<h2>Recipe</h2>
<pre>{html.escape(recipe_yaml)}</pre>
<script type="application/json" id="summary">{html.escape(json.dumps(summary, default=str))}</script>
</body></html>
"""
