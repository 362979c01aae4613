"""Structured outputs: what grammar-constrained decoding costs, and which library to build it on.

1. The library: llguidance and xgrammar side by side on the same byte-level BPE tokenizer (trained
   here on the standard library's source, 32,000 tokens): each schema's compile time (first and
   cached), the time to compute one token mask along a valid JSON document, and which of a list
   of JSON-schema features each compiles (coverage).
2. The cost in gptkit's engine (llguidance, the one chosen): decode tokens/s with and without a
   JSON schema at batch 1 and batch 8, same random model (GPT-2 124M's shape with that vocabulary),
   same seeds, greedy; constrained rows that finish early are replaced so the batch stays full.

    python benchmarks/structured.py [--rounds 2] [--tiny]

xgrammar is a comparator only (`pip install xgrammar`); without it part 1 reports llguidance alone.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "tags": ["red", "blue"],
            "address": {"city": "London", "zip": "W1"}}
FEATURES = {  # one small schema per feature
    "enum/const": {"enum": ["a", 1, None]}, "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]}, "$ref/$defs": {
        "$defs": {"p": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/p"}},
    "pattern": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}, "format date-time": {
        "type": "string", "format": "date-time"}, "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "numbers min/max": {"type": "number", "minimum": -1.5, "maximum": 2.5}, "patternProperties": {
        "type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "boolean"}},
    "recursive $ref": {"$defs": {"t": {"type": "object", "properties": {"c": {"type": "array", "items": {
        "$ref": "#/$defs/t"}}}}}, "$ref": "#/$defs/t"},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "string"}}}]},
    "not": {"not": {"type": "string"}}, "if/then": {"if": {"type": "integer"}, "then": {"minimum": 0}},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
}


def train_tokenizer(vocab: int):
    from gptkit.text.tokenizer import BPETokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]
    return BPETokenizer.train(texts, vocab_size=vocab)


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ------------------------------------------------------------------------------------ part 1
def libraries(tok) -> dict:
    from gptkit.inference.constrain import Constraint, GrammarVocab, json_schema_grammar, _grammar
    from gptkit.text.tokenizer import EOT

    out: dict = {}
    eos = [tok.special_id(EOT)]
    vocab = GrammarVocab(tok.token_bytes, lambda s: tok.encode(s, special=False), tok.vocab_size, eos,
                         list(tok.special_tokens.values()))
    t = time.perf_counter()
    vocab.get()
    out["llguidance_tokenizer_s"] = time.perf_counter() - t
    doc = tok.encode(json.dumps(DOCUMENT), special=False)
    _grammar.cache_clear()
    t = time.perf_counter()
    grammar = json_schema_grammar(SCHEMA)
    Constraint(vocab, grammar)
    out["llguidance_compile_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    Constraint(vocab, json_schema_grammar(SCHEMA))
    out["llguidance_compile_cached_ms"] = (time.perf_counter() - t) * 1e3
    words = (tok.vocab_size + 31) // 32

    def walk_llg() -> None:
        c = Constraint(vocab, grammar)
        mask = torch.zeros(words, dtype=torch.int32)
        for token in doc:
            c.fill(mask)
            c.consume(token)
    out["llguidance_mask_us"] = best(walk_llg) / len(doc) * 1e6
    coverage = {}
    for name, schema in FEATURES.items():
        try:
            vocab.check(json_schema_grammar(schema))
            coverage[name] = True
        except Exception:
            coverage[name] = False
    out["llguidance_features"] = coverage
    try:
        import xgrammar as xgr
    except ImportError:
        return out
    t = time.perf_counter()
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(tok.vocab_size)], vocab_type=xgr.VocabType.RAW,
                             stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    out["xgrammar_tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    out["xgrammar_compile_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    out["xgrammar_compile_cached_ms"] = (time.perf_counter() - t) * 1e3
    xdoc = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), special=False)

    def walk_xgr() -> None:
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
        for token in xdoc:
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(token)
    out["xgrammar_mask_us"] = best(walk_xgr) / len(xdoc) * 1e6
    coverage = {}
    for name, schema in FEATURES.items():
        try:
            compiler.compile_json_schema(json.dumps(schema))
            coverage[name] = True
        except Exception:
            coverage[name] = False
    out["xgrammar_features"] = coverage
    return out


# ------------------------------------------------------------------------------------ part 2
def engine_speed(tok, tiny: bool, rounds: int) -> dict:
    from gptkit.config import ModelConfig, SampleConfig, preset
    from gptkit.inference.constrain import json_schema_grammar
    from gptkit.inference.factory import build_engine
    from gptkit.model.gpt import GPT

    torch.manual_seed(0)
    cfg = (ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=64) if tiny
           else ModelConfig(**{**preset("gpt2").to_dict(), "vocab_size": tok.vocab_size}))
    grammar = json_schema_grammar(SCHEMA)
    out = {}
    prompt = tok.encode("Write a person as JSON:")
    new = 64
    with torch.inference_mode():
        for batch in (1, 8):
            engine = build_engine(GPT(cfg), tok, max_batch=batch, stop_at_eos=False)
            engine.grammar_vocab.get()
            rates = {"free": 0.0, "json": 0.0}
            for _ in range(rounds):
                for kind in rates:
                    params = SampleConfig(max_tokens=new, temperature=1.0, seed=0,
                                          grammar=grammar if kind == "json" else None)

                    def run() -> int:  # tokens generated; a schema row may end before max_tokens
                        return sum(len(c.token_ids) for c in engine.generate(prompt, params, n=batch))
                    run()
                    t = time.perf_counter()
                    n = run()
                    rates[kind] = max(rates[kind], n / (time.perf_counter() - t))
            out[f"b{batch}_free_tok_s"], out[f"b{batch}_json_tok_s"] = rates["free"], rates["json"]
            out[f"b{batch}_ratio"] = rates["json"] / rates["free"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (the mask's cost weighs most)")
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    t = time.perf_counter()
    tok = train_tokenizer(args.vocab)
    print(f"tokenizer: {tok.vocab_size} tokens ({time.perf_counter() - t:.0f}s)", flush=True)
    result = {"threads": torch.get_num_threads(), "vocab": tok.vocab_size, **libraries(tok)}
    print(json.dumps(result, indent=1), flush=True)
    result.update(engine_speed(tok, args.tiny, args.rounds))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
