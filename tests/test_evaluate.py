"""`admmq eval`: its default text ships in the package, and the KL divergence to a reference
model is the one computed directly from both models' next-token distributions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from admmq_dist import evaluate
from admmq_dist.cli import main
from admmq_dist.evaluate import EVALUATION_TEXT, evaluation_text, perplexity
from admmq_dist.model.calibration import read_text, split_text

from tiny import tiny_model_dir

SHARED_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / \
    "wiki.test.raw"


def test_the_default_text_ships_in_the_package_and_is_the_half_calibration_leaves():
    package = Path(evaluate.__file__).resolve().parent
    assert EVALUATION_TEXT.is_file() and package in EVALUATION_TEXT.parents
    text = evaluation_text(None, "test", "text")
    calibration = read_text(str(package / "data" / "calibration.txt"))
    assert len(text) > 600_000 and text[:2000] not in calibration
    if not SHARED_TEST.is_file():
        pytest.skip("the WikiText-2 test file is not beside this checkout")
    first, second = split_text(read_text(str(SHARED_TEST)), 0.5)
    assert text == first and calibration == second


def _direct_kl(model_dir: Path, reference_dir: Path, seq_len: int, windows: int) -> float:
    """Mean token KL(P_ref ‖ P_model) written out: Σ p_ref (log p_ref − log p_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(
        evaluation_text(None, "test", "text"), return_tensors="pt").input_ids[0]
    lm, ref = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
               for d in (model_dir, reference_dir))
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seq_len:(w + 1) * seq_len][None]
            p = torch.softmax(ref(chunk).logits[0, :-1].double(), -1)
            q = torch.softmax(lm(chunk).logits[0, :-1].double(), -1)
            total += float((p * (p.log() - q.log())).sum())
    return total / (windows * (seq_len - 1))


def test_kl_to_a_reference_is_the_direct_figure_and_zero_against_itself(tmp_path):
    model = tiny_model_dir(tmp_path / "model", "llama", seed=1)
    reference = tiny_model_dir(tmp_path / "reference", "llama", seed=0)
    plain = perplexity(str(model), seq_len=64, max_windows=3)
    assert "kl" not in plain
    against = perplexity(str(model), seq_len=64, max_windows=3, reference=str(reference))
    itself = perplexity(str(reference), seq_len=64, max_windows=3, reference=str(reference))
    direct = _direct_kl(model, reference, 64, 3)
    assert direct > 1e-3
    assert math.isclose(against["kl"], direct, rel_tol=1e-4)
    assert math.isclose(against["ppl"], plain["ppl"], rel_tol=1e-6)
    assert math.isclose(against["reference_ppl"], itself["ppl"], rel_tol=1e-6)
    assert abs(itself["kl"]) < 1e-7


def test_a_reference_with_another_vocabulary_is_refused_before_any_weight_is_read(tmp_path,
                                                                                  monkeypatch):
    model = tiny_model_dir(tmp_path / "model", "llama")
    reference = tiny_model_dir(tmp_path / "reference", "llama", vocab_size=400)
    loaded = []
    monkeypatch.setattr(evaluate, "_load", lambda *a: loaded.append(a))
    with pytest.raises(ValueError, match="vocabulary of 400 tokens, the model 3"):
        perplexity(str(model), seq_len=64, max_windows=1, reference=str(reference))
    assert loaded == []


def test_the_command_reports_kl_with_a_reference(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model", "llama", seed=1)
    reference = tiny_model_dir(tmp_path / "reference", "llama", seed=0)
    assert main(["eval", str(model), "--seq-len", "64", "--max-windows", "2", "--reference",
                 str(reference), "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["kl"] > 0 and result["reference"] == str(reference)
    assert "KL divergence from" in out.err


def test_a_bare_reference_is_the_embedded_float_model(monkeypatch, capsys):
    from admmq_dist import cli, cli_eval

    seen = {}
    monkeypatch.setattr(cli, "embedded_model_folder", lambda: Path("/embedded"))
    monkeypatch.setattr(cli_eval, "perplexity", lambda model, **kw: seen.update(kw, model=model) or {
        "ppl": 2.0, "windows": 1, "seq_len": 8, "tokens": 7, "model": model, "kl": 0.1,
        "reference_ppl": 1.9, "reference": kw["reference"]})
    assert main(["eval", "out", "--reference"]) == 0
    assert seen["reference"] == "/embedded" and seen["model"] == "out"
    assert main(["eval", "out"]) == 0 and seen["reference"] is None


def _own_accuracy(model_dir: Path, task_folder: Path) -> float:
    """The local task's accuracy written out: each choice's summed log-likelihood after the
    context (the harness's split of one encoding of context + " " + choice), the best one's
    index against the label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = rows = 0
    for line in (task_folder / "local_cloze.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = tok(doc["context"]).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["context"] + " " + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(lm(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context),
                                                                           len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        rows += 1
    return right / rows


def test_harness_tasks_score_what_the_models_log_likelihoods_say(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from local_task import write_local_task

    tasks = write_local_task(tmp_path / "tasks", docs=24)
    accuracies = []
    for seed in (0, 1):  # two random models: the figure follows the model, it is not a constant
        model = tiny_model_dir(tmp_path / f"model{seed}", "llama", seed=seed)
        assert main(["eval", str(model), "--tasks", "local_cloze", "--include-path", str(tasks),
                     "--device", "cpu", "--json"]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        metrics = got["tasks"]["local_cloze"]
        assert metrics["sample_len"] == 24 and got["backend"] == "hf"
        assert metrics["acc"] == pytest.approx(_own_accuracy(model, tasks))
        assert metrics["acc_stderr"] > 0
        accuracies.append(metrics["acc"])
    assert accuracies[0] != accuracies[1]


def test_an_unknown_task_is_refused_before_any_weight_is_read(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    model = tiny_model_dir(tmp_path / "model", "llama")
    assert main(["eval", str(model), "--tasks", "no_such_task_anywhere"]) == 1
    err = capsys.readouterr().err
    assert "unknown task(s) no_such_task_anywhere" in err and "--include-path" in err


def test_a_model_spread_over_devices_and_disk_scores_the_one_device_figures(tmp_path):
    """--device-map with --max-memory: what does not fit the device is offloaded to disk (the
    one way to spread a model on a machine without GPUs), and the figures do not change."""
    model = tiny_model_dir(tmp_path / "model", "llama", num_hidden_layers=4)
    plain = perplexity(str(model), seq_len=64, max_windows=3, reference=str(model))
    spread = perplexity(str(model), seq_len=64, max_windows=3, reference=str(model),
                        device_map="auto", max_memory={"cpu": "60KB"})
    assert plain["devices"] == ["cpu"] and "disk" in spread["devices"]
    assert spread["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert spread["kl"] == pytest.approx(0.0, abs=1e-6)


def test_tasks_without_the_harness_installed_say_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it now fails
    model = tiny_model_dir(tmp_path / "model", "llama")
    for extra in ([], ["--model-args", "dtype=float32"]):
        assert main(["eval", str(model), "--tasks", "arc_easy", *extra]) == 1
        assert "pip install 'admmq-dist[eval]'" in capsys.readouterr().err
