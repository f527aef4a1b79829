"""A tiny random-weight Llama model in Hugging Face format, generated at test time
(never committed, never downloaded), for the `vllm` tier.

It exists so the suite can run REAL vLLM on a CPU: `LlamaForCausalLM` with hidden size
256, 2 layers, 4 heads (2 KV heads, head_dim 64), a byte-level BPE tokenizer trained here
on a few sentences by the `tokenizers` library, and a ChatML chat template. Its output is
noise; it proves vLLM's protocol, not a model.

This file runs in vLLM's own virtualenv (.cache/vllm-venv: torch, transformers and
tokenizers live there, not in the project's .venv), so it imports nothing from the
project. Usage: python tiny_hf_model.py OUT_DIR [SEED]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there, how are you today?",
    "def slugify(text): return text.lower().replace(' ', '-')",
    "a page of results starts at offset zero and holds at most limit items",
    "convert metres to feet and kilograms to pounds",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
]


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    return out


if __name__ == "__main__":
    path = write_tiny_model(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(path)
