"""Per-token cost of a JSON-schema grammar's token mask: xgrammar vs llguidance on one
tokenizer and schema (issue 24 item 4: choose by measured cost). Per token of a valid
document: fill the next-token bitmask, then accept the document's token; the compile time is
reported apart. CPU, one sequence.

    python bench/grammar_mask_bench.py [--tokenizer DIR] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
DOC = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engine"]}'


def bench_xgrammar(hf_tok, ids, repeats):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=len(hf_tok))
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    total = 0.0
    for _ in range(repeats):
        m = xgr.GrammarMatcher(compiled)
        t0 = time.perf_counter()
        for t in ids:
            m.fill_next_token_bitmask(mask)
            assert m.accept_token(t), t
        total += time.perf_counter() - t0
    return compile_s, total / (repeats * len(ids))


def bench_llguidance(hf_tok, ids, repeats):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok = llguidance.hf.from_tokenizer(hf_tok)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    m0 = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    assert not m0.is_error(), m0.get_error()
    mask = llt.allocate_token_bitmask(1, lltok.vocab_size)
    total = 0.0
    for _ in range(repeats):
        m = llguidance.LLMatcher(lltok, grammar)
        t0 = time.perf_counter()
        for t in ids:
            llt.fill_next_token_bitmask(m, mask, 0)
            assert m.consume_token(t), (t, m.get_error())
        total += time.perf_counter() - t0
    return compile_s, total / (repeats * len(ids))


def main():
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the demo checkpoint's)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if args.tokenizer is None:
        from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
        args.tokenizer = ensure_demo_checkpoint()
    hf_tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = hf_tok.encode(DOC, add_special_tokens=False)
    print(f"tokenizer {args.tokenizer}: vocab {len(hf_tok)}, document {len(ids)} tokens, {args.repeats} repeats")
    print("| library | compile (ms) | mask + accept per token (us) |")
    print("|---|---|---|")
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        compile_s, per_token = fn(hf_tok, ids, args.repeats)
        print(f"| {name} | {compile_s * 1e3:.1f} | {per_token * 1e6:.1f} |")


if __name__ == "__main__":
    main()
