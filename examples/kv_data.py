"""Data for train_cp.py: a long-context retrieval task made on the fly, and text windows.

Retrieval: filler tokens with ``pairs`` facts scattered through the body of each sequence, fact
``c`` being one token ``VALUE(c, v)`` (class c, value v), and ``queries`` questions at the end,
each ``QUERY(c), VALUE(c, v)``. Loss and accuracy are on predicting ``VALUE(c, v)`` from the
position of ``QUERY(c)``: the question must attend to the block holding its fact, far back in the
context, so the gate has to route there. One attention layer can solve it (match the class,
copy the value), so small models learn it in a few hundred steps. Chance accuracy is
``1 / NUM_VALUES``.
"""

from __future__ import annotations

import torch

FILLER = (8, 64)
NUM_CLASSES, NUM_VALUES = 8, 8
QUERY = 64  # QUERY(c) = QUERY + c
VALUE = QUERY + NUM_CLASSES  # VALUE(c, v) = VALUE + c * NUM_VALUES + v
VOCAB = 256  # also the byte vocabulary of text data (examples/lm_corpus.py)
VALUES = (0, NUM_VALUES)  # chance = 1 / (VALUES[1] - VALUES[0])


def kv_batch(
    batch: int, seq_len: int, pairs: int, queries: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [batch, seq_len]`` int64 and ``target_mask [batch, seq_len]`` (True where the
    next token is an answer to be predicted)."""
    if not 1 <= queries <= pairs <= NUM_CLASSES or pairs + 2 * queries > seq_len // 2:
        raise ValueError(
            f"need 1 <= queries <= pairs <= {NUM_CLASSES} and room in seq_len: got pairs={pairs}, "
            f"queries={queries}, seq_len={seq_len}"
        )
    tokens = torch.randint(*FILLER, (batch, seq_len), generator=gen)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    body = seq_len - 2 * queries
    for b in range(batch):
        classes = torch.randperm(NUM_CLASSES, generator=gen)[:pairs]
        facts = VALUE + classes * NUM_VALUES + torch.randint(0, NUM_VALUES, (pairs,), generator=gen)
        tokens[b, torch.randperm(body, generator=gen)[:pairs]] = facts
        asked = torch.randperm(pairs, generator=gen)[:queries]
        for i, a in enumerate(asked.tolist()):
            s = body + 2 * i
            tokens[b, s] = QUERY + classes[a]
            tokens[b, s + 1] = facts[a]
            mask[b, s] = True
    return tokens, mask


def text_batch(
    data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a byte-level text corpus ``data [N]``; every position is a target."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"--data has {data.numel()} bytes, fewer than --seq-len {seq_len} + 2")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    tokens = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[:, -1] = False  # the last position has no next token inside the window
    return tokens, mask
