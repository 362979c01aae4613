"""Build a random tiny open model with transformers, saved as a Hugging Face folder
(config.json + model.safetensors + tokenizer.json): the README's "Open models" walk-through runs on
it, since nothing may be downloaded. Real models (SmolLM2-135M, Qwen2.5-0.5B, ...) are folders of the
same form.

    python docs/examples/tiny_open_model.py llama runs/tiny-llama
"""

import sys
from pathlib import Path

import torch
import transformers

from gptkit.data.sources import stdlib_documents
from gptkit.text.tokenizer import BPETokenizer

SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False))}

if __name__ == "__main__":
    family, out = sys.argv[1], Path(sys.argv[2])
    texts = [text for _, (_, text) in zip(range(200), stdlib_documents())]
    tok = BPETokenizer.train(texts, vocab_size=1024)  # byte-level BPE with <|endoftext|>, <|im_start|>, <|im_end|>
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=tok.vocab_size, **SHAPE, **extra))
    model.save_pretrained(out)
    tok.tok.save(str(out / "tokenizer.json"))
    print(f"{out}: random {model_cls.__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
