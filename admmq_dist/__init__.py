"""admmq-dist: distributed post-training quantization of LLMs with ADMM-Q."""

__version__ = "0.1.0"
