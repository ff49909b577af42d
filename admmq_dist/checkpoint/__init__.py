"""Writing quantized checkpoints that inference engines (vLLM, SGLang, TGI, transformers) load unchanged."""

from admmq_dist.checkpoint.writer import CheckpointWriter

__all__ = ["CheckpointWriter"]
