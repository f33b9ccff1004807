"""Data for train_cp.py: a long-context key-value retrieval task made on the fly, or a text file.

Retrieval: filler tokens with ``pairs`` key-value facts scattered through the body of each
sequence, each fact one token ``PAIR(k, v)``, and ``queries`` questions at the end, each
``QUERY, ASK(k), ANSWER(v)``. The loss and accuracy are on predicting ``ANSWER(v)`` from the
position of ``ASK(k)``: the question must attend to the block holding ``PAIR(k, v)``, far back
in the context, so the gate has to route there. Chance accuracy is ``1 / NUM_VALUES``.
"""

from __future__ import annotations

import torch

QUERY = 1
FILLER = (8, 64)
NUM_KEYS, NUM_VALUES = 32, 16
ASK = 64  # ASK(k) = ASK + k
PAIR = ASK + NUM_KEYS  # PAIR(k, v) = PAIR + k * NUM_VALUES + v
ANSWER = PAIR + NUM_KEYS * NUM_VALUES  # ANSWER(v) = ANSWER + v
VOCAB = ANSWER + NUM_VALUES
VALUES = (ANSWER, ANSWER + NUM_VALUES)


def kv_batch(
    batch: int, seq_len: int, pairs: int, queries: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [batch, seq_len]`` int64 and ``target_mask [batch, seq_len]`` (True where the
    next token is an answer to be predicted)."""
    if pairs > NUM_KEYS or queries > pairs or pairs + 3 * queries > seq_len // 2:
        raise ValueError(
            f"need queries <= pairs <= {NUM_KEYS} and room in seq_len: got pairs={pairs}, "
            f"queries={queries}, seq_len={seq_len}"
        )
    tokens = torch.randint(*FILLER, (batch, seq_len), generator=gen)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    body = seq_len - 3 * queries
    for b in range(batch):
        keys = torch.randperm(NUM_KEYS, generator=gen)[:pairs]
        vals = torch.randint(0, NUM_VALUES, (pairs,), generator=gen)
        slots = torch.randperm(body, generator=gen)[:pairs]
        tokens[b, slots] = PAIR + keys * NUM_VALUES + vals
        asked = torch.randperm(pairs, generator=gen)[:queries]
        for i, a in enumerate(asked.tolist()):
            s = body + 3 * i
            tokens[b, s : s + 3] = torch.tensor([QUERY, ASK + keys[a], ANSWER + vals[a]])
            mask[b, s + 1] = True
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


def load_text(path: str) -> torch.Tensor:
    """Bytes of a text file as int64 tokens (vocabulary 256, within VOCAB)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
