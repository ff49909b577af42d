"""The run report: per-layer figures with baselines, and a self-contained HTML page whose plots
decode and show something (checked in headless Chromium where it is installed)."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from admmq_dist.run.job import quantize_model
from admmq_dist.recipe import Recipe, override
from admmq_dist.report import module_type, render_html

from tiny import tiny_model_dir

SETTINGS = {"grid": {"bits": 3, "group_size": 32},
            "solver": {"admm": {"iterations": 60}},
            "calibration": {"dataset": None, "num_samples": 8, "seq_len": 64, "batch_size": 4},
            "report": {"compare": True}}
PLOTS = ["loss-across-depth", "admm-q-convergence", "time"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory.mktemp("src"), "llama")
    out = tmp_path_factory.mktemp("out") / "ckpt"
    summary = quantize_model(str(model), out, override(Recipe(), SETTINGS),
                             device=torch.device("cpu"), progress=False)
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    return out, summary, records


def test_every_layer_reports_admmq_beside_gptq_and_rtn(run):
    _, summary, records = run
    assert len(records) == summary["layers"] == 14
    for r in records:
        base = r["compare"]
        # Same Hessian, same grid: ADMM-Q (initialised from GPTQ, then polished) never loses to
        # round-to-nearest, and stays within a hair of GPTQ on every layer.
        assert 0 < r["loss"] <= base["rtn"], r["layer"]
        assert r["loss"] <= base["gptq"] * 1.02, r["layer"]
        assert len(r["residual"]) == len(r["rho"]) == r["iterations"] <= 60
        assert r["rho"][0] == pytest.approx(0.1)
        assert all(b >= a for a, b in zip(r["rho"], r["rho"][1:]))  # ρ only grows
        assert r["residual"][-1] < r["residual"][0]
    mean = lambda k: sum(r["compare"][k] for r in records) / len(records)  # noqa: E731
    assert summary["mean_loss"] < 0.97 * mean("gptq") < 0.97 * mean("rtn")


def _decode(src: str) -> np.ndarray:
    from matplotlib.image import imread

    assert src.startswith("data:image/png;base64,")
    return imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")


def test_the_page_is_self_contained_and_its_plots_are_not_blank(run):
    out, summary, records = run
    page = (out / "report.html").read_text()
    images = dict(re.findall(r'<img class="plot" id="([^"]+)"[^>]*src="([^"]+)"', page))
    assert sorted(images) == sorted(PLOTS)
    for name, src in images.items():
        pixels = _decode(src)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400, name
        # A blank figure is one colour; a plot has lines, text and axes.
        assert pixels[..., :3].std() > 0.05, name
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    for r in records:
        assert r["layer"] in page
    # What crossed between processes, by kind (summary["bytes_moved"]).
    for kind, count in summary["bytes_moved"]["total"].items():
        assert f"<th>moved: {kind}</th><td>{count / 2**20:.1f} MiB</td>" in page
    assert summary["bytes_moved"]["total"]["weights"] > 0


def test_rounds_get_their_plot_with_rho_where_the_schedule_has_one():
    records = [{"layer": "model.layers.0.mlp.down_proj", "block": 0, "loss": 0.02,
                "seconds": 1.0, "iterations": 2, "residual": [0.1, 0.05], "rho": [0.1, 0.11]}]
    summary = {"model": "m", "seconds": {"forward": 1.0, "solve": 2.0},
               "rounds": [{"round": 0, "changed": 1.0, "mean_loss": 0.03},
                          {"round": 1, "changed": 0.04, "mean_loss": 0.025}]}
    page = render_html(records, summary)
    assert 'id="rounds"' in page
    # The coordinated schedule's rounds carry ρ, and its polish comes last by name.
    coordinated = {**summary, "schedule": "coordinated",
                   "rounds": [{**r, "rho": 0.1 * (r["round"] + 1)} for r in summary["rounds"]]
                   + [{"round": "polish", "changed": 0.01, "mean_loss": 0.02}]}
    image = r'id="rounds" alt="Rounds" src="data:image/png;base64,([^"]+)"'
    plot = re.search(image, render_html(records, coordinated)).group(1)
    plain = re.search(image, page).group(1)
    assert plot != plain
    assert module_type("model.layers.3.mlp.experts.7.w1") == "mlp.experts.w1"
    assert module_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"


def test_the_summary_lists_every_fault_once_and_the_memory_plan_once():
    records = [{"layer": "model.layers.0.mlp.down_proj", "block": 0, "loss": 0.02}]
    summary = {"model": "m", "memory_plan": {"peak_bytes": 2**30, "worst": "block 0"},
               "faults": [{"where": "block 1", "error": "WorkerLost: worker 1 died in capture",
                           "restarted_workers": [1], "redone": "block 1: solve"}]}
    page = render_html(records, summary)
    assert page.count("planned peak memory") == 1
    assert "<th>fault 1</th><td>block 1: WorkerLost: worker 1 died in capture; workers " \
           "rebuilt [1]; redone: block 1: solve</td>" in page
    assert "fault 1" not in render_html(records, {**summary, "faults": []})


CHECK = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const img of document.querySelectorAll('img.plot')) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, c.width, c.height).data;
    let colours = new Set();
    for (let i = 0; i < data.length; i += 4 * 97) colours.add(data[i] << 16 | data[i+1] << 8 | data[i+2]);
    out.push({id: img.id, complete: img.complete, width: img.naturalWidth,
              height: img.naturalHeight, colours: colours.size});
  }
  const pre = document.createElement('pre');
  pre.id = 'check'; pre.textContent = 'CHECK' + JSON.stringify(out) + 'END';
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                    "(.ci/run installs it)")
def test_headless_chromium_decodes_every_plot(run, tmp_path):
    out, _, _ = run
    page = tmp_path / "report.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r"<pre id=\"check\">CHECK(.*?)END</pre>", result.stdout)
    assert found, result.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert sorted(i["id"] for i in images) == sorted(PLOTS)
    for img in images:
        assert img["complete"] and img["width"] > 400 and img["height"] > 200, img
        assert img["colours"] > 8, img  # not a blank canvas


def test_writing_a_checkpoint_does_not_import_matplotlib():
    # vLLM's CI environment writes checkpoints without matplotlib installed; only drawing a
    # report may need it.
    code = ("import sys; import admmq_dist.run.job, admmq_dist.cli; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
