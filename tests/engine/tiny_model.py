"""A tiny random-weight llama model in GGUF, generated at test time (never committed).

It exists so the suite can run a REAL inference engine (llama.cpp) on a CPU: 2 layers,
64 dimensions, a byte-level BPE tokenizer with a few dozen merges, and a ChatML chat
template. Its output is noise; it proves the engine's protocol quirks, not a model.
The file is byte-identical for a given seed, so a test can pin its digest.

Usage: python -m tests.engine.tiny_model OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

N_EMBD, N_FF, N_LAYER, N_HEAD, N_CTX = 64, 128, 2, 4, 512
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MERGE_PAIRS = [
    ("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("e", "n"),
    ("a", "t"), ("o", "u"), ("e", "d"), ("i", "s"), ("o", "r"), ("e", "s"), ("a", "r"), ("t", "o"),
    ("Ġ", "t"), ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "w"), ("Ġ", "c"), ("Ġ", "o"), ("Ġ", "f"), ("Ġ", "i"),
    ("Ġt", "he"), ("Ġ", "th"), ("i", "ng"), ("n", "g"), ("l", "l"), ("s", "t"), ("Ġ", "d"), ("Ġ", "p"),
    ("Ġ", "m"), ("Ġ", "b"), ("Ġ", "h"), ("Ġ", "in"), ("Ġ", "re"), ("Ġ", "an"), ("Ġ", "on"), ("Ġ", "is"),
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_vocab() -> list[str]:
    """GPT-2's reversible byte-to-unicode table: every byte is one printable symbol."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    table = dict(zip(keep, chars, strict=True))
    return [chr(table[b]) for b in range(256)]


def tokenizer() -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_vocab()
    merges: list[str] = []
    for a, b in _MERGE_PAIRS:
        if a in tokens and b in tokens and a + b not in tokens:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    types = [1] * len(tokens) + [3] * len(SPECIALS)  # 1 normal, 3 control
    return tokens + SPECIALS, types, merges


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    # numpy and gguf come with the engine extra; imported here so that collecting the suite
    # (make test-fast, which installs only the test extra) does not need them.
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer()
    n_vocab = len(tokens)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-engine-test-model")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", w(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    out = write_tiny_model(Path(sys.argv[1]))
    print(f"{out} {out.stat().st_size} bytes")
