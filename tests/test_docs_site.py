"""The docs site (issue 31 item 2): its generated pages come from the code — the CLI reference
from the parser (every command), the home page from the README — and, where mkdocs is installed
(`pip install -e '.[docs]'`; CI's run builds the site with --strict), the site builds."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def hook():
    spec = importlib.util.spec_from_file_location("generated", ROOT / "docs/hooks/generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_every_commands_help():
    from admmq_dist.cli import build_parser

    text = hook().on_page_markdown((ROOT / "docs/cli.md").read_text(), None, None, None)
    for command in ("quantize", "plan", "eval", "inspect", "verify", "doctor"):
        assert f"## admmq {command}" in text
    assert build_parser().format_help().rstrip() in text
    assert "--coordinated-iterations N" in text and "<!-- cli-reference -->" not in text


def test_the_home_page_is_the_readme_and_every_page_is_in_the_nav():
    import yaml

    assert (ROOT / "docs/index.md").read_text().strip() == '--8<-- "README.md"'
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values()))
            yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == listed


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="pip install -e '.[docs]'")
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site/cli/index.html").is_file()
