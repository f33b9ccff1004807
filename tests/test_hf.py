"""Hugging Face transformers integration: a tiny random Llama (no downloads) with MoBA attention.

Reference: an independent MoBA attention written here from docs/semantics.md (block means, dense
scores, rank-based top-k with ties to the lower block, dense masked softmax), registered with
transformers under its own name, so the same weights run both. Everything is float64, so the
only differences are summation orders (~1e-13); `ATOL` leaves a wide margin above that while
staying far below the MoBA-vs-dense gap the tests also check.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.56")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from moba_dist import moba_attn_func  # noqa: E402
from moba_dist.config import MoBAConfig  # noqa: E402
from moba_dist.integrations import hf_decode  # noqa: E402
from moba_dist.integrations.hf import (  # noqa: E402
    CACHE_ARG,
    MoBACache,
    MoBAStaticCache,
    moba_attention_forward,
    register_moba,
)

# float64 model: paths differ only in summation order (~1e-13 on these logits).
ATOL = 1e-9
# generate() hands back its logits cast to float32: one float32 ulp of these logits is ~1e-6.
ATOL_GEN = 1e-5
VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a shared 2-core machine: thread hand-offs cost more than the math.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def naive_moba_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, topk: int,
                    scale: float) -> torch.Tensor:  # fmt: skip
    """One sequence, ``q [n, Hq, D]``, ``k, v [n, Hkv, D]`` -> ``[n, Hq, D]``, straight from the
    semantics with a dense ``[Hq, n, n]`` mask."""
    n, hq, _ = q.shape
    k, v = (x.repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))  # oracle may repeat
    nb = -(-n // block)
    cent = torch.stack([k[j * block : (j + 1) * block].mean(0) for j in range(nb)])  # [nb, Hq, D]
    s = torch.einsum("thd,jhd->htj", q, cent)
    own = torch.arange(n) // block
    past = torch.arange(nb)[None, :] < own[:, None]  # [n, nb] candidates
    s = s.masked_fill(~past, float("-inf"))
    # Rank of block j = #candidates scoring higher, or equal with a lower id; keep rank < K-1.
    ids = torch.arange(nb)
    beats = (s[..., :, None] > s[..., None, :]) | (
        (s[..., :, None] == s[..., None, :]) & (ids[:, None] < ids[None, :])
    )
    rank = (beats & past[None, :, :, None]).sum(-2)
    chosen = (rank < topk - 1) & past[None] | (ids[None, None, :] == own[None, :, None])
    tok = torch.arange(n)
    mask = chosen[:, :, tok // block] & (tok[None, :] <= tok[:, None])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", probs, v)


def register_oracle(block: int, topk: int) -> str:
    """Register the naive MoBA (cache-less forwards only) as its own attn_implementation."""
    name = f"oracle_b{block}_k{topk}"

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        assert query.shape[2] == key.shape[2], "the oracle runs cache-less forwards only"
        bt, hq, s, d = query.shape
        out = torch.zeros(bt, s, hq, d, dtype=query.dtype)
        for b in range(bt):
            real = torch.ones(s, dtype=torch.bool) if attention_mask is None else attention_mask[b]
            pos = real.nonzero().squeeze(1)
            q, k, v = (x[b].transpose(0, 1)[pos] for x in (query, key, value))
            out[b, pos] = naive_moba_rows(q, k, v, block, topk, scaling)
        return out, None

    def mask(attention_mask=None, **kwargs):
        return None if attention_mask is None else attention_mask.bool()

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, pad_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = register_moba(4, 2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def use(model: LlamaForCausalLM, name: str) -> LlamaForCausalLM:
    model.config._attn_implementation = name
    return model


def logits(model, ids, mask=None, position_ids=None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids, **kw).logits


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids of a left-padded batch, as generate() computes them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def greedy(model, ids, n, **kw):
    """generate() greedy decoding -> (tokens [B, n], logits [B, n, V])."""
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, **kw,
        )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def oracle_greedy(model, ids, n):
    """Greedy decoding by full recomputation with the oracle -> (tokens, logits)."""
    toks, steps = ids, []
    for _ in range(n):
        step = logits(model, toks, use_cache=False)[:, -1]
        steps.append(step)
        toks = torch.cat([toks, step.argmax(-1, keepdim=True)], 1)
    return toks[:, ids.shape[1] :], torch.stack(steps, 1)


BLOCK_TOPK = [
    pytest.param(4, 2, id="b4-k2"),
    pytest.param(4, 3, id="b4-k3"),
    pytest.param(5, 1, id="b5-k1-own-block"),
    pytest.param(3, 99, id="b3-k99-dense"),
]


@pytest.mark.parametrize(("block", "topk"), BLOCK_TOPK)
def test_prefill_matches_oracle(model, block, topk):
    ids = torch.randint(1, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    got = logits(use(model, register_moba(block, topk, name=f"moba_b{block}_k{topk}")), ids)
    want = logits(use(model, register_oracle(block, topk)), ids)
    dense = logits(use(model, "sdpa"), ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if topk >= -(-23 // block):
        torch.testing.assert_close(got, dense, atol=ATOL, rtol=0)  # K >= blocks: causal
    else:
        assert (got - dense).abs().max() > 1e-3  # the weights make block selection matter


@pytest.mark.parametrize(("block", "topk"), [BLOCK_TOPK[0], BLOCK_TOPK[1]])
def test_greedy_generate_matches_recompute_and_oracle(model, block, topk):
    # 6-token prompt + 18 new tokens: the decode steps cross 4-5 block boundaries.
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    use(model, register_moba(block, topk, name=f"moba_b{block}_k{topk}"))
    toks, lg = greedy(model, ids, 18, **{CACHE_ARG: MoBACache(model.config)})
    toks_nc, lg_nc = greedy(model, ids, 18, use_cache=False)
    toks_or, lg_or = oracle_greedy(use(model, register_oracle(block, topk)), ids, 18)
    assert torch.equal(toks, toks_nc) and torch.equal(toks, toks_or)
    torch.testing.assert_close(lg, lg_nc, atol=ATOL_GEN, rtol=0)
    torch.testing.assert_close(lg, lg_or.float(), atol=ATOL_GEN, rtol=0)


def test_generate_without_moba_cache_warns_and_matches(model):
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    use(model, "moba")
    toks, lg = greedy(model, ids, 10, **{CACHE_ARG: MoBACache(model.config)})
    with pytest.warns(UserWarning, match="without MoBACache"):
        toks_dc, lg_dc = greedy(model, ids, 10)  # transformers' default DynamicCache
    assert torch.equal(toks, toks_dc)
    torch.testing.assert_close(lg, lg_dc, atol=ATOL_GEN, rtol=0)


def padded_batch(lengths, width, left, seed=4):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_padded_prefill_matches_unpadded_rows(model, left):
    rows, ids, mask = padded_batch([13, 6, 10], 13, left)
    use(model, "moba")
    pos = left_positions(mask) if left else None  # RoPE positions of real tokens start at 0
    got = logits(model, ids, mask, pos)
    for b, r in enumerate(rows):
        real = mask[b].bool()
        torch.testing.assert_close(got[b, real], logits(model, r[None])[0], atol=ATOL, rtol=0)


def test_left_padded_generate_matches_rows(model):
    rows, ids, mask = padded_batch([9, 3, 6], 9, left=True)
    use(model, "moba")
    toks, lg = greedy(model, ids, 12, attention_mask=mask, **{CACHE_ARG: MoBACache(model.config)})
    for b, r in enumerate(rows):
        t1, l1 = greedy(model, r[None], 12, **{CACHE_ARG: MoBACache(model.config)})
        assert torch.equal(toks[b], t1[0])
        torch.testing.assert_close(lg[b], l1[0], atol=ATOL_GEN, rtol=0)


def test_right_padded_generate_raises(model):
    _, ids, mask = padded_batch([9, 5], 9, left=False)
    with pytest.raises(ValueError, match="right padding"):
        greedy(use(model, "moba"), ids, 3, attention_mask=mask, **{CACHE_ARG: MoBACache()})


def test_mask_with_hole_raises(model):
    ids = torch.randint(1, VOCAB, (1, 8))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding between real tokens"):
        logits(use(model, "moba"), ids, mask)


def test_packed_sequences_match_separate_rows(model):
    a, b = torch.randint(1, VOCAB, (11,)), torch.randint(1, VOCAB, (7,))
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    got = logits(use(model, "moba"), torch.cat([a, b])[None], position_ids=pos, use_cache=False)
    torch.testing.assert_close(got[0, :11], logits(model, a[None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0, 11:], logits(model, b[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [None, 1], ids=["one-chunk", "chunked"])
def test_chunked_prefill_into_cache_matches_full(model, budget, monkeypatch):
    # A multi-token chunk appended to a filled cache takes the decode path (nq > 1); budget=1
    # makes decoding split it into one query and one batch row at a time.
    if budget is not None:
        monkeypatch.setattr(hf_decode, "_GATHER_BUDGET", budget)
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    use(model, "moba")
    cache = MoBACache(model.config)
    first = logits(model, ids[:, :9], **{CACHE_ARG: cache})
    rest = logits(model, ids[:, 9:], **{CACHE_ARG: cache})
    torch.testing.assert_close(torch.cat([first, rest], 1), logits(model, ids), atol=ATOL, rtol=0)


def fill(model, ids, mask=None):
    """A MoBACache holding ``ids`` (prefill of all but 3 tokens, then 3 decode steps)."""
    cache, n = MoBACache(model.config), ids.shape[1]
    mask = torch.ones_like(ids) if mask is None else mask
    for s0, s1 in [(0, n - 3), (n - 3, n - 2), (n - 2, n - 1), (n - 1, n)]:
        pos = left_positions(mask)[:, s0:s1]
        logits(model, ids[:, s0:s1], mask[:, :s1], pos, **{CACHE_ARG: cache})
    return cache


def test_cache_sums_are_block_sums(model):
    _, ids, mask = padded_batch([14, 9], 14, left=True)
    cache = fill(use(model, "moba"), ids, mask)
    for layer in cache.layers:
        for b, s in enumerate(layer.moba_starts):
            for j in range((14 - s) // 4):
                want = layer.keys[b, :, s + 4 * j : s + 4 * j + 4].sum(1)
                torch.testing.assert_close(layer.moba_sums[b, :, j], want, atol=1e-12, rtol=0)


def test_cache_crop_then_continue(model):
    ids = torch.randint(1, VOCAB, (1, 19), generator=torch.Generator().manual_seed(6))
    use(model, "moba")
    cache = fill(model, ids)
    cache.crop(-6)  # back to 13 tokens: block 3 (positions 12..15) must be re-summed
    # New candidate tokens fed as one chunk, as assisted decoding does after a rejection.
    ids[:, 13:] = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    got = logits(model, ids[:, 13:], **{CACHE_ARG: cache})
    torch.testing.assert_close(got, logits(model, ids)[:, 13:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("nq", [1, 3], ids=["one-query", "three-queries"])
def test_decode_ties_go_to_lower_block(nq):
    # Small integers: block sums, centroids (B = 4) and scores are exact, so many scores tie
    # exactly; the decode gate must pick what the single-device op picks (lower block first).
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-1, 2, (1, 4, 23, 8), generator=g).double()
    k = torch.randint(-1, 2, (1, 2, 23, 8), generator=g).double()
    v = torch.randn(1, 2, 23, 8, generator=g, dtype=torch.float64)
    want = moba_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), moba_chunk_size=4, moba_topk=3)
    with pytest.warns(UserWarning, match="without MoBACache"):  # no cache: sums from the keys
        got, _ = _call(query=q[:, :, -nq:], key=k, value=v, moba=MoBAConfig(4, 3))
    torch.testing.assert_close(got, want[:, -nq:], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "how", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"]
)
def test_cache_batch_reorder_matches_fresh(model, how):
    _, ids, mask = padded_batch([12, 7, 10], 12, left=True)
    use(model, "moba")
    cache = fill(model, ids[:, :-1], mask[:, :-1])
    repeat = how == "batch_repeat_interleave"
    index = torch.tensor([0, 0, 1, 1, 2, 2] if repeat else [2, 0, 0])
    getattr(cache, how)(2 if repeat else index)
    ids, mask = ids[index], mask[index]
    got = logits(model, ids[:, -1:], mask, left_positions(mask)[:, -1:], **{CACHE_ARG: cache})
    want = logits(model, ids, mask, left_positions(mask))[:, -1:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_beam_search_matches_no_cache(model):
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    use(model, "moba")
    kw = {"max_new_tokens": 10, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(ids, **{CACHE_ARG: MoBACache(model.config)}, **kw)
        fresh = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, fresh)


def test_prompt_lookup_decoding_matches_no_cache(model):
    # Prompt-lookup (assisted) decoding proposes 3 tokens per step and crops the cache on rejects.
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = use(model, "moba").generate(
            ids, prompt_lookup_num_tokens=3, **{CACHE_ARG: MoBACache(model.config)}, **kw
        )
        fresh = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, fresh)


def grads(model, ids, mask):
    """Parameter gradients of the padded batch's LM loss (padding excluded from the labels)."""
    model.zero_grad(set_to_none=True)
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prefill_backward_with_padding_matches_oracle(model):
    # The oracle is plain differentiable PyTorch (dense mask from the semantics): gradients of
    # every weight must agree to float64 summation noise, and differ from dense attention's.
    _, ids, mask = padded_batch([10, 6], 10, left=False)
    model.train()
    try:
        got = grads(use(model, "moba"), ids, mask)
        want = grads(use(model, register_oracle(4, 2)), ids, mask)
        dense = grads(use(model, "sdpa"), ids, mask)
    finally:
        use(model, "moba").eval().zero_grad(set_to_none=True)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=name)
    assert max((got[n] - dense[n]).abs().max() for n in got) > 1e-4


def test_from_pretrained_with_attn_implementation(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=register_moba(4, 2))
    assert loaded.config._attn_implementation == "moba"
    ids = torch.randint(1, VOCAB, (1, 9))
    torch.testing.assert_close(logits(loaded.double(), ids), logits(use(model, "moba"), ids))


def test_both_cache_spellings_give_the_same_tokens(model):
    # transformers 5.2x renamed generate(past_key_values=) to cache= (the old one warns); MoBA's
    # cache works under either name and gives the same tokens.
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    use(model, "moba")
    toks, lg = greedy(model, ids, 9, **{CACHE_ARG: MoBACache(model.config)})
    with contextlib.ExitStack() as stack:
        if CACHE_ARG == "cache":  # the old name still works, with transformers' deprecation
            stack.enter_context(pytest.warns(FutureWarning, match="past_key_values"))
        toks_old, lg_old = greedy(model, ids, 9, past_key_values=MoBACache(model.config))
    toks_nc, _ = greedy(model, ids, 9, use_cache=False)
    assert torch.equal(toks, toks_nc) and torch.equal(toks_old, toks_nc)
    torch.testing.assert_close(lg, lg_old, atol=0, rtol=0)


def test_static_cache_left_padded_generate_matches_recompute(model):
    rows, ids, mask = padded_batch([9, 3, 6], 9, left=True)
    use(model, "moba")
    cache = MoBAStaticCache(model.config, max_cache_len=9 + 14)
    toks, lg = greedy(model, ids, 14, attention_mask=mask, **{CACHE_ARG: cache})
    toks_nc, lg_nc = greedy(model, ids, 14, attention_mask=mask, use_cache=False)
    assert torch.equal(toks, toks_nc)
    torch.testing.assert_close(lg, lg_nc, atol=ATOL_GEN, rtol=0)
    for layer in cache.layers:  # preallocated once, never grown
        assert layer._kbuf.shape[2] == 23 and layer.moba_sums.shape[2] == 23 // 4
    for b, r in enumerate(rows):
        assert torch.equal(
            toks[b], oracle_greedy(use(model, register_oracle(4, 2)), r[None], 14)[0][0]
        )
        use(model, "moba")


def test_static_cache_beam_search_and_prompt_lookup_match_no_cache(model):
    # Beam search reorders the cache every step; prompt lookup crops it on rejected proposals.
    # The references are the same search without a cache (plain greedy for prompt lookup).
    use(model, "moba")
    kw = {"do_sample": False, "pad_token_id": 0}
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    look = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    cases = [
        ({"num_beams": 3}, {"num_beams": 3}, ids, 10),
        ({"prompt_lookup_num_tokens": 3}, {}, look, 16),
    ]
    with torch.no_grad():
        for extra, ref, x, n in cases:
            cache = MoBAStaticCache(model.config, max_cache_len=x.shape[1] + n + 4)
            cached = model.generate(x, max_new_tokens=n, **{CACHE_ARG: cache}, **extra, **kw)
            fresh = model.generate(x, max_new_tokens=n, use_cache=False, **ref, **kw)
            assert torch.equal(cached, fresh), extra


def test_static_cache_full_raises(model):
    ids = torch.randint(1, VOCAB, (1, 6))
    cache = MoBAStaticCache(model.config, max_cache_len=8)
    with pytest.raises(ValueError, match="max_cache_len=8"):
        greedy(use(model, "moba"), ids, 5, **{CACHE_ARG: cache})
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        MoBAStaticCache(model.config, max_cache_len=0)


class _Attn(torch.nn.Module):
    is_causal = True


class _NonCausal(torch.nn.Module):
    is_causal = False


MASK_4D = torch.ones(1, 1, 6, 6)


def _call(**over):
    """moba_attention_forward on small valid inputs with some arguments overridden."""
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    args = {"module": _Attn(), "query": q, "key": k, "value": k, "attention_mask": None}
    args.update(over)
    args.setdefault("moba", MoBAConfig(4, 2))
    return moba_attention_forward(**args)


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        pytest.param({"dropout": 0.1}, NotImplementedError, "dropout", id="dropout"),
        pytest.param({"sliding_window": 4}, NotImplementedError, "sliding_window", id="sliding"),
        pytest.param({"softcap": 30.0}, NotImplementedError, "softcap", id="softcap"),
        pytest.param({"module": _NonCausal()}, NotImplementedError, "causal", id="non-causal"),
        pytest.param({"attention_mask": MASK_4D}, NotImplementedError, "4-D", id="4d-mask"),
        pytest.param({"query": torch.randn(1, 4, 7, 8)}, ValueError, "nq <= L", id="q-longer"),
    ],
)
def test_unsupported_modes_raise(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def set_dropout(model, p: float) -> None:
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p  # read at init from config.attention_dropout


def test_dropout_in_training_mode_raises(model):
    set_dropout(use(model, "moba"), 0.1)
    try:
        logits(model, torch.randint(1, VOCAB, (1, 5)))  # eval mode: transformers passes 0.0
        with pytest.raises(NotImplementedError, match="dropout"):
            model.train()(torch.randint(1, VOCAB, (1, 5)))
    finally:
        set_dropout(model, 0.0)
        model.eval()


def test_sliding_window_model_raises():
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
    )  # fmt: skip
    cfg._attn_implementation = register_moba(4, 2)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        MoBACache(cfg)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        logits(transformers.MistralForCausalLM(cfg), torch.randint(1, VOCAB, (1, 6)))


def test_static_cache_raises(model):
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="static"):
        logits(use(model, "moba"), torch.randint(1, VOCAB, (1, 5)), **{CACHE_ARG: cache})


def test_block_size_change_in_cache_raises(model):
    ids = torch.randint(1, VOCAB, (1, 9))
    cache = fill(use(model, "moba"), ids)
    with pytest.raises(ValueError, match="moba_chunk_size changed"):
        logits(use(model, register_moba(5, 2, name="moba_b5")), ids[:, -1:], **{CACHE_ARG: cache})


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        pytest.param((0, 2), ValueError, "moba_chunk_size", id="chunk-0"),
        pytest.param((4, "2"), TypeError, "moba_topk", id="topk-str"),
        pytest.param((4, 2, "sdpa"), ValueError, "name", id="name-sdpa"),
        pytest.param((4, 2, "my_flash"), ValueError, "name", id="name-flash"),
        pytest.param((4, 2, ""), ValueError, "name", id="name-empty"),
        pytest.param((4, 2, "moba", "bogus"), ValueError, "backend", id="backend"),
    ],
)
def test_register_moba_bad_args(args, exc, match):
    with pytest.raises(exc, match=match):
        register_moba(*args)


def test_import_moba_dist_does_not_import_transformers():
    code = "import sys, moba_dist; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
