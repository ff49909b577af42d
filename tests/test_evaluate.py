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
    from admmq_dist import cli

    seen = {}
    monkeypatch.setattr(cli, "embedded_model_folder", lambda: Path("/embedded"))
    monkeypatch.setattr(cli, "perplexity", lambda model, **kw: seen.update(kw, model=model) or {
        "ppl": 2.0, "windows": 1, "seq_len": 8, "tokens": 7, "model": model, "kl": 0.1,
        "reference_ppl": 1.9, "reference": kw["reference"]})
    assert main(["eval", "out", "--reference"]) == 0
    assert seen["reference"] == "/embedded" and seen["model"] == "out"
    assert main(["eval", "out"]) == 0 and seen["reference"] is None
