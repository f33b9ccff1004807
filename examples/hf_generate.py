"""Generate text with a Hugging Face causal LM whose attention is MoBA.

    python examples/hf_generate.py                          # tiny random Llama, offline, CPU
    python examples/hf_generate.py --model Qwen/Qwen2.5-0.5B --block 64 --topk 3 \\
        --prompt "The capital of France is" --max-new-tokens 40

``register_moba`` makes ``attn_implementation="moba"`` available; the prompt is prefilled with
the MoBA op and every new token is decoded with MoBA through ``MoBACache`` (the block key sums
travel with the KV cache; ``--static`` preallocates a ``MoBAStaticCache`` instead). The cache is
passed as ``cache=`` on transformers releases that deprecate ``past_key_values=``, as
``past_key_values=`` before (``CACHE_ARG``; both spellings work). With ``--check`` the tokens
are compared with greedy decoding by full recomputation (no cache), which must agree. Without
``--model`` a tiny randomly initialised Llama with a byte-level "tokenizer" is built, so the
script runs offline in seconds (its text is gibberish: the weights are random).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moba_dist.integrations.hf import CACHE_ARG, MoBACache, MoBAStaticCache, register_moba


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local path or hub id (default: tiny random)")
    p.add_argument("--prompt", default="Mixture of Block Attention routes every query to")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--block", type=int, default=16, help="moba_chunk_size (block size)")
    p.add_argument("--topk", type=int, default=3, help="moba_topk (blocks per query, own included)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check", action="store_true", help="compare with cache-less decoding")
    p.add_argument("--static", action="store_true", help="preallocated MoBAStaticCache")
    return p.parse_args()


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough to drive the tiny random model."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def tiny_model(attn: str) -> tuple[LlamaForCausalLM, ByteTokenizer]:
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), ByteTokenizer()


def load(args: argparse.Namespace, attn: str):
    """(model, tokenizer) on ``args.device``."""
    if args.model is None:
        # Matrices this small run fastest on one thread (hand-offs cost more than the math).
        torch.set_num_threads(1)
        model, tok = tiny_model(attn)
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, attn_implementation=attn, dtype="auto"
        ).eval()
    return model.to(args.device), tok


def generate(model, ids: torch.Tensor, n: int, cached: bool, static: bool = False) -> torch.Tensor:
    """Greedy decoding of ``n`` tokens: with a MoBA cache, or recomputing everything each step."""
    if not cached:
        cache = {"use_cache": False}
    elif static:
        cache = {CACHE_ARG: MoBAStaticCache(model.config, max_cache_len=ids.shape[1] + n)}
    else:
        cache = {CACHE_ARG: MoBACache(model.config)}
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            pad_token_id=pad, **cache,
        )  # fmt: skip
    return out[0, ids.shape[1] :]


def main() -> None:
    args = parse_args()
    attn = register_moba(moba_chunk_size=args.block, moba_topk=args.topk)
    model, tok = load(args, attn)
    ids = torch.tensor([tok.encode(args.prompt)], device=args.device)
    start = time.perf_counter()
    new = generate(model, ids, args.max_new_tokens, cached=True, static=args.static)
    secs = time.perf_counter() - start
    total = ids.shape[1] + new.numel()
    print(f"model: {args.model or 'tiny random Llama'}  attention: MoBA block={args.block} "
          f"topk={args.topk}  tokens: {ids.shape[1]} prompt + {new.numel()} new "
          f"({-(-total // args.block)} blocks)")  # fmt: skip
    print(f"new token ids: {new.tolist()}")
    print(f"prompt: {args.prompt!r}\ncontinuation: {tok.decode(new.tolist())!r}")
    print(f"{new.numel() / secs:.1f} tokens/s (prefill + decode, {args.device})")
    if args.check:
        same = torch.equal(new, generate(model, ids, args.max_new_tokens, cached=False))
        print(f"cached MoBA decoding equals full recomputation: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
