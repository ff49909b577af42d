"""The package versions a benchmark ran with, for its results file.

Figures on the embedded model move with more than admmq-dist's code: the GGUF conversion
(``gguf``, ``transformers``) and the tokenizer (``tokenizers``) decide the calibration and
evaluation tokens, so a rerun can only be compared with a result that names the same versions.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "tokenizers", "gguf", "compressed-tensors", "ray")


def describe() -> str:
    """``"python 3.11.2, torch 2.13.0+cpu, transformers 5.22.2, …"`` (absent packages left out)."""
    parts = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)
