"""pyproject.toml states what the code needs (issue 31 item 6): transformers 5 (the fused MoE
modules), compressed-tensors (what transformers loads our checkpoints with), Ray only as an extra
(the in-process path runs without it, and says what to install when --workers asks for it)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def names(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        name = req.split(";")[0]
        for sep in (">=", "==", "<", "["):
            name = name.split(sep)[0]
        out[name.strip()] = req
    return out


def test_the_core_needs_transformers_5_and_compressed_tensors_and_not_ray():
    core = names(project()["dependencies"])
    assert core["transformers"] == "transformers>=5.0"
    assert "compressed-tensors" in core and "ray" not in core
    installed = int(metadata.version("transformers").split(".")[0])
    assert installed >= 5


def test_the_extras_a_user_picks_from():
    extras = project()["optional-dependencies"]
    assert {"ray", "eval", "docs", "test"} <= set(extras)
    assert names(extras["ray"])["ray"].startswith("ray[default]")
    assert "ray" in names(extras["test"])  # the suite runs the cluster tests


def test_workers_without_ray_say_what_to_install(monkeypatch):
    from admmq_dist.run import ray_backend

    monkeypatch.setattr(ray_backend, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'admmq-dist\[ray\]'"):
        ray_backend.RayBackend(2)
