"""Mixture-of-experts: fused experts split per expert, quantized with routed (or all-token)
Hessians, written under the checkpoint's per-expert names, loaded back by transformers."""

import json

import pytest
import yaml
import torch
from safetensors import safe_open

from admmq_dist.model.arch import find_blocks
from admmq_dist.model.capture import calibration_stages, record_block_calls
from admmq_dist.model.loading import TensorIndex
from admmq_dist.model.moe import ExpertList, Expert, expert_lists, load_fused_into, unfuse_experts
from admmq_dist.run.job import quantize_model
from admmq_dist.quant.packing import unpack_compressed_tensors_weight
from admmq_dist.recipe import Recipe, override

from runs import digest
from tiny import tiny_model_dir

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
FAST = {"calibration": {"dataset": None, "num_samples": 8, "seq_len": 64, "batch_size": 4}}


def quantize(src, out, **updates):
    recipe = override(Recipe(), {**FAST, "output": {"dtype": "float32"}, **updates})
    return quantize_model(str(src), out, recipe, device=torch.device("cpu"), progress=False)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def split_in_place(model, folder):
    """Replace the model's fused experts by ExpertLists holding the same weights."""
    layout, blocks = find_blocks(model)
    index_names = TensorIndex(folder, model.config.model_type).module_names()
    for b, block in enumerate(blocks):
        fused = {n: m for n, m in block.named_modules() if hasattr(m, "gate_up_proj")}
        unfuse_experts(block, layout.block_prefix(b), index_names)
        for path, experts in expert_lists(block).items():
            load_fused_into(experts, fused[path].gate_up_proj.data, fused[path].down_proj.data)
    return model


@pytest.mark.parametrize("arch", MOE)
def test_split_experts_compute_what_the_fused_ones_do(tmp_path, arch):
    folder = tiny_model_dir(tmp_path, arch)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load(folder)(ids).logits
        model = split_in_place(load(folder), folder)
        got = model(ids).logits
    assert len(expert_lists(find_blocks(model)[1][0])) == 1
    assert not any(p.dim() == 3 for p in model.parameters())
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max()) + 1e-5


def test_expert_stages_group_every_expert_by_role(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(tmp_path, "mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layout, blocks = find_blocks(model)
    split_in_place(model, folder)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        calls = record_block_calls(model, blocks, [ids], torch.device("cpu"))
        linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
        stages = calibration_stages(blocks[0], linears, calls.first_hidden[0], calls.args[0][0],
                                    calls.kwargs[0][0])
    assert [s.groups for s in stages[:2]] == [
        [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]], [["self_attn.o_proj"]]]
    assert stages[2].experts == "mlp.experts" and stages[2].role == 0
    assert stages[2].groups == [[f"mlp.experts.{e}.w1", f"mlp.experts.{e}.w3"] for e in range(4)]
    assert stages[3].groups == [[f"mlp.experts.{e}.w2"] for e in range(4)]
    assert len(stages) == 4


def dequantized_checkpoint(folder, bits):
    """Per-module dense weights rebuilt from a symmetric compressed-tensors folder, by our own
    unpacker (independent of the compressed-tensors library)."""
    out, names = {}, []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names += list(f.keys())
            _dequantize_into(out, f, bits)
    return out, names


def _dequantize_into(out, f, bits):
    for name in f.keys():
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            rows, cols = f.get_tensor(f"{module}.weight_shape").tolist()
            codes = unpack_compressed_tensors_weight(f.get_tensor(name), bits, (rows, cols))
            scale = f.get_tensor(f"{module}.weight_scale").float()
            scale = scale.repeat_interleave(cols // scale.shape[1], dim=1)
            out[module] = scale * (codes.float() - 2 ** (bits - 1))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_checkpoint_uses_per_expert_names_and_loads_exactly(tmp_path, arch):
    src = tiny_model_dir(tmp_path / "src", arch)
    out = tmp_path / "out"
    summary = quantize(src, out, grid={"bits": 4, "group_size": 32, "symmetric": True},
                       calibration={**FAST["calibration"], "min_expert_tokens": 1})
    experts_per_block = 4 * 3
    dense_per_block = 4 + (3 if arch == "qwen2_moe" else 0)  # attention (+ shared expert)
    assert summary["layers"] == 2 * (experts_per_block + dense_per_block)
    assert summary["experts"] == {"routed": 2 * experts_per_block, "all-tokens": 0, "rtn": 0}
    dense, names = dequantized_checkpoint(out, 4)
    container = "block_sparse_moe" if arch == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for b in range(2):
        for e in range(4):
            for leaf in (gate, up, down):
                assert f"model.layers.{b}.{container}.experts.{e}.{leaf}" in dense
        # Routers stay dense, under the checkpoint's own names.
        assert f"model.layers.{b}.{container}.gate.weight" in names
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    # Every dense module is named exactly, whatever its class (routers are TopKRouter modules in
    # transformers 5, linear layers in vLLM), under the checkpoint's names and the module paths.
    for b in range(2):
        assert f"model.layers.{b}.{container}.gate" in config["ignore"]
        assert f"model.layers.{b}.mlp.gate" in config["ignore"]
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names
        assert "model.layers.1.mlp.shared_expert_gate" in config["ignore"]
    assert not any(".experts." in entry for entry in config["ignore"])

    # transformers fuses the experts again as it loads; the result is exactly our weights.
    quant = load(out)
    reference = load(src)
    with torch.no_grad():
        for b, layer in enumerate(reference.model.layers):
            qexp, rexp = quant.model.layers[b].mlp.experts, layer.mlp.experts
            for e in range(4):
                p = f"model.layers.{b}.{container}.experts.{e}"
                rexp.gate_up_proj[e] = torch.cat([dense[f"{p}.{gate}"], dense[f"{p}.{up}"]])
                rexp.down_proj[e] = dense[f"{p}.{down}"]
            assert torch.equal(qexp.gate_up_proj, rexp.gate_up_proj)
            assert torch.equal(qexp.down_proj, rexp.down_proj)
            for name, module in layer.named_modules():
                key = f"model.layers.{b}.{name}"
                if isinstance(module, torch.nn.Linear) and key in dense:
                    module.weight.copy_(dense[key])
        ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
        got, expected = quant(ids).logits, reference(ids).logits
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_under_routed_experts_fall_back_and_the_report_says_which(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "mixtral")
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(3))
    errors = {}
    for fallback in ("all-tokens", "rtn"):
        out = tmp_path / fallback
        # The plain objective and no scale refit: the comparison is of the experts'
        # calibration alone (both change the attention layers of the two runs differently).
        summary = quantize(src, out, grid={"bits": 3, "group_size": 32, "symmetric": True},
                           calibration={**FAST["calibration"], "min_expert_tokens": 10**6,
                                        "expert_fallback": fallback, "num_samples": 32,
                                        "asymmetric": 0.0},
                           solver={"scale_refits": 0})
        assert summary["experts"][fallback] == 24 and summary["experts"]["routed"] == 0
        rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
        expert_rows = [r for r in rows if ".experts." in r["layer"]]
        assert {r["calibration"] for r in expert_rows} == {fallback}
        assert all(r["tokens"] > 0 for r in expert_rows)
        assert {r["method"] for r in expert_rows} == ({"rtn"} if fallback == "rtn" else {"admmq"})
        with torch.no_grad():
            errors[fallback] = float((load(out)(ids).logits - load(src)(ids).logits).pow(2).mean())
    # Calibrated from every token beats rounding (the Hessian still knows the input statistics).
    # 32 samples: from 8 (512 tokens for 4 experts' Hessians) the margin was a few percent and
    # moved with the tokenizer's training (0.97× at tokenizers 0.23; 0.72× from 32 samples).
    assert errors["all-tokens"] < 0.9 * errors["rtn"]


def test_all_token_calibration_runs_the_expert_on_every_token_without_changing_outputs():
    torch.manual_seed(0)
    experts = ExpertList([Expert(8, 16, ("w1", "w3", "w2"), torch.float32, "cpu")
                          for _ in range(3)], torch.nn.SiLU())
    x = torch.randn(10, 8)
    index = torch.tensor([[0, 1]] * 9 + [[1, 2]])
    weights = torch.full((10, 2), 0.5)
    seen = []
    experts[2].w2.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        routed = experts(x, index, weights)
        experts.calibrate_all = frozenset({2})
        everything = experts(x, index, weights)
    assert seen == [1, 10]
    assert experts.routed_tokens == [18, 20, 2]
    assert torch.allclose(routed, everything, atol=1e-6)


def test_defaults_work_on_moe_and_pick_a_symmetric_grid_saying_why(tmp_path):
    """No grid flags on a mixture-of-experts model: the asymmetric default cannot be served by
    transformers (it reads no expert zero points), so the run picks symmetric and says so."""
    src = tiny_model_dir(tmp_path / "src", "mixtral")
    summary = quantize(src, tmp_path / "out", grid={"bits": 4, "group_size": 32})
    assert summary["symmetric"] is True
    assert len(summary["notes"]) == 1 and "symmetric grid" in summary["notes"][0]
    recipe_yaml = (tmp_path / "out" / "recipe.yaml").read_text()
    assert recipe_yaml.startswith("# symmetric grid: a mixture-of-experts model")
    assert yaml.safe_load(recipe_yaml)["grid"]["symmetric"] is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is True
    # A dense model keeps the asymmetric default, with nothing to say.
    dense = quantize(tiny_model_dir(tmp_path / "dense", "llama"), tmp_path / "dense-out",
                     grid={"bits": 4, "group_size": 32})
    assert dense["symmetric"] is False and dense["notes"] == []


def test_explicit_asymmetric_moe_warns_and_unservable_moe_is_refused_before_any_work(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "mixtral")
    summary = quantize(src, tmp_path / "out", grid={"bits": 4, "group_size": 32,
                                                      "symmetric": False})
    assert summary["symmetric"] is False
    assert [n for n in summary["notes"] if n.startswith("transformers will not serve")]
    packed = set()
    for file in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            packed |= {n for n in f.keys() if n.endswith("weight_zero_point")}
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight_zero_point" in packed
    # 8-bit experts with zero points: no vLLM MoE kernel and no transformers loader.
    with pytest.raises(ValueError, match="no engine serves 8-bit asymmetric"):
        quantize(src, tmp_path / "out8", grid={"bits": 8, "group_size": 32, "symmetric": False})
    assert not (tmp_path / "out8").exists()


def test_a_checkpoint_with_fused_expert_tensors_is_split_on_load(tmp_path):
    """Some checkpoints store the experts fused; they load, and are written per expert."""
    from safetensors.torch import save_file

    src = tiny_model_dir(tmp_path / "src", "qwen3_moe")
    model = load(src).requires_grad_(False)
    (src / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in TensorIndex(src)
    out = tmp_path / "out"
    summary = quantize(src, out, grid={"bits": 8, "group_size": 32, "symmetric": True})
    assert summary["experts"]["routed"] == 24
    dense, names = dequantized_checkpoint(out, 8)
    assert "model.layers.1.mlp.experts.3.down_proj" in dense
    assert not any("gate_up_proj" in n for n in names)
    inter = model.config.moe_intermediate_size
    fused = model.model.layers[0].mlp.experts.gate_up_proj[2]
    rebuilt = torch.cat([dense["model.layers.0.mlp.experts.2.gate_proj"],
                         dense["model.layers.0.mlp.experts.2.up_proj"]])
    assert rebuilt.shape == (2 * inter, model.config.hidden_size)
    # 8-bit: the written expert is its float weight to within a few percent (gate and up in
    # the wrong order, or another expert's rows, would be off by more than 100%).
    assert float((rebuilt - fused).norm() / fused.norm()) < 0.03


def test_cli_flags_reach_the_expert_calibration(tmp_path, capsys):
    from admmq_dist.cli import main

    src = tiny_model_dir(tmp_path / "src", "qwen3_moe")
    args = ["quantize", str(src), "-o", str(tmp_path / "out"), "--bits", "4", "--group-size",
            "32", "--sym", "--num-samples", "4", "--seq-len", "32", "--method", "gptq",
            "--min-expert-tokens", "100000", "--expert-fallback", "rtn", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["experts"] == {"routed": 0, "all-tokens": 0, "rtn": 24}
    # A layout no engine serves is refused in one line, naming the flag that fixes it.
    asym = [a if a != "--sym" else "--asym" for a in args]
    asym[asym.index("-o") + 1] = str(tmp_path / "asym")
    asym[asym.index("--bits") + 1] = "8"
    assert main(asym) == 1
    err = capsys.readouterr().err
    assert "no engine serves 8-bit asymmetric" in err and err.rstrip().endswith("use --sym")
    assert not (tmp_path / "asym").exists()


EIGHT_EXPERTS = override(Recipe(), {
    **FAST, "output": {"dtype": "float32"}, "grid": {"group_size": 32},
    "calibration": {**FAST["calibration"], "min_expert_tokens": 1}})


@pytest.fixture(scope="module")
def eight_experts(tmp_path_factory):
    """A two-block Qwen3-MoE of eight experts, and its checkpoint quantized on one worker."""
    root = tmp_path_factory.mktemp("eight-experts")
    src = tiny_model_dir(root / "src", "qwen3_moe", num_experts=8)
    quantize_model(str(src), root / "one", EIGHT_EXPERTS, device=torch.device("cpu"),
                   progress=False)
    return src, digest(root / "one")


def test_an_expert_stage_is_solved_expert_by_expert_in_the_bytes_of_any_worker_count(
        tmp_path, monkeypatch, eight_experts):
    """With at least as many experts as workers, each expert's Hessian is solved whole on its
    owner (no merged Hessian handed to another worker) and dropped after its last row block, so
    a worker never holds more than one expert's factors; the bytes are those of one worker."""
    from admmq_dist.run.backends import LocalBackend
    from admmq_dist.run.worker import Worker

    src, one = eight_experts
    events = []
    original = {name: getattr(Worker, name) for name in ("solve", "release_hessian",
                                                          "merged_hessian")}

    def spy(name):
        def method(self, b, *args):
            events.append((name, id(self), (b, args[0] if name != "solve" else args[1])))
            return original[name](self, b, *args)
        return method

    for name in original:
        monkeypatch.setattr(Worker, name, spy(name))
    quantize_model(str(src), tmp_path / "two", EIGHT_EXPERTS, device=torch.device("cpu"),
                   progress=False, backend=LocalBackend(2))
    monkeypatch.undo()
    experts = {key for kind, _, key in events if kind == "solve" and "experts." in str(key[1])}
    assert len(experts) == 2 * 8 * 2  # two blocks, eight experts, two stages (gate/up, down)
    for key in experts:
        solvers = {w for kind, w, k in events if kind == "solve" and k == key}
        released = [i for i, (kind, _, k) in enumerate(events)
                    if kind == "release_hessian" and k == key]
        last_solve = max(i for i, (kind, _, k) in enumerate(events)
                         if kind == "solve" and k == key)
        assert len(solvers) == 1 and len(released) == 1 and released[0] > last_solve, key
    assert not [k for kind, _, k in events if kind == "merged_hessian" and "experts." in k[1]]
    assert digest(tmp_path / "two") == one


def test_expert_stages_the_device_cannot_capture_at_once_are_captured_in_waves(
        tmp_path, monkeypatch, eight_experts):
    """On devices that hold the block only with two experts' partial sums at a time, each
    expert stage is captured and solved in waves of two experts (one forward pass each, the
    plan counting only the wave's statistics): four captures per expert stage instead of one,
    a smaller planned peak, the bytes of one capture."""
    from admmq_dist.run.backends import LocalBackend
    from admmq_dist.run.worker import Worker

    src, one = eight_experts
    plan, capture = Worker.memory_plan, Worker.capture
    peaks, captured = {}, []

    def small_device(self, b, stages, workers):
        out = plan(self, b, stages, workers)
        wave = max(len(st.groups) for st in stages if st.experts is not None)
        peaks.setdefault(wave, out["peak"])
        out["capacity"] = out["peak"] - (wave > 2)  # only waves of two experts fit
        return out

    def count(self, b, stage, *args):
        captured.append((id(self), b, stage.experts, stage.role, len(stage.groups)))
        return capture(self, b, stage, *args)

    monkeypatch.setattr(Worker, "memory_plan", small_device)
    monkeypatch.setattr(Worker, "capture", count)
    summary = quantize_model(str(src), tmp_path / "waves", EIGHT_EXPERTS,
                             device=torch.device("cpu"), progress=False, backend=LocalBackend(2))
    monkeypatch.undo()
    waves = [c for c in captured if c[2] is not None]
    assert len(waves) == 2 * 2 * 2 * 4  # workers, blocks, expert stages, waves
    assert {c[4] for c in waves} == {2}
    assert summary["memory_plan"]["expert_waves"] == 4
    assert peaks[2] < peaks[8], peaks
    assert digest(tmp_path / "waves") == one
