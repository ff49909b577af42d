"""Tiny offline models and tokenizers for tests: real architectures, random weights, seconds."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the of and to in a is was for on as with by at from his that it an were are which "
         "this be first also after its new had their one two city season year time film game "
         "music world war team state river north south series album song band school").split()


def sample_text(num_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (num_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[k:k + 12]) + " ." for k in range(0, num_words, 12)]
    return "\n".join(lines) + "\n"


def byte_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in a fraction of a second on :func:`sample_text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(sample_text().splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                   model_max_length=1 << 20)


def tiny_model_dir(root: Path, model_type: str = "llama", seed: int = 0,
                   dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save a tiny random model of ``model_type`` with a tokenizer into ``root``, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type in ("gemma2", "gemma3_text"):
        kwargs.update(head_dim=16)
    if model_type == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      decoder_sparse_step=1, norm_topk_prob=True)
    if model_type == "qwen2_moe":
        kwargs.update(shared_expert_intermediate_size=128)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Outlier input channels, as real LLMs have, so solvers differ measurably.
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.mul_(torch.exp(0.7 * torch.randn_like(param)))
    root.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
