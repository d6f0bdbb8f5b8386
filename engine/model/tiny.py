"""Tiny randomly initialised models and a byte-level tokenizer, for fast offline tests.

Both are deterministic: the same spec gives the same weights on every machine, so tests can
compare numbers across runs without downloading anything.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SEED = 1234

# A chat template in the ChatML style SmolLM2 uses, so chat code paths run on tiny models too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_VOCAB = 256 + len(SPECIAL_TOKENS)


def tiny_config(family: str, **overrides: Any) -> Any:
    """The configuration of a tiny model of ``family`` ("gpt2" or "llama")."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        params: dict[str, Any] = dict(
            vocab_size=TINY_VOCAB, n_positions=1024, n_embd=64, n_layer=4, n_head=4,
            n_inner=128, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=256, eos_token_id=258, tie_word_embeddings=True,
        )
        params.update(overrides)
        return GPT2Config(**params)
    if family == "llama":
        params = dict(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=256, eos_token_id=258, tie_word_embeddings=True, rms_norm_eps=1e-5,
        )
        params.update(overrides)
        return LlamaConfig(**params)
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_model(family: str, seed: int = TINY_SEED, **overrides: Any) -> Any:
    """A tiny randomly initialised causal LM, identical for the same arguments."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model
