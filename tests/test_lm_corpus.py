"""examples/lm_corpus.py and examples/lm_eval.py: the stdlib corpus builder and bits per byte."""

from __future__ import annotations

import hashlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
from lm_corpus import SEPARATOR, build_corpus, file_corpus
from lm_eval import LossSums, bits_per_byte, bucket_ids, unigram_bits_per_byte


def make_tree(root) -> list[str]:
    """25 kept .py files (names sorted out of creation order) plus files the filter must drop;
    returns the kept relative paths in sorted order."""
    kept = []
    for i in reversed(range(25)):
        rel = os.path.join("pkg" if i % 2 else "", f"m{i:02d}.py")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(f"x = {i}\n" * (i + 1))
        kept.append(os.path.normpath(rel))
    for skipped in ("site-packages/a.py", "test/t.py", "pkg/__pycache__/c.py", "readme.txt"):
        os.makedirs(os.path.join(root, os.path.dirname(skipped) or "."), exist_ok=True)
        with open(os.path.join(root, skipped), "w") as f:
            f.write("SKIPPED\n")
    return sorted(kept)


def read(root, rels) -> bytes:
    parts = []
    for r in rels:
        with open(os.path.join(root, r), "rb") as f:
            parts.append(f.read())
    return SEPARATOR.join(parts)


def test_corpus_is_deterministic_and_splits_by_file(tmp_path):
    kept = make_tree(tmp_path)
    a, b = build_corpus(str(tmp_path), held_out_every=5), build_corpus(str(tmp_path), 5)
    assert a.info == b.info and torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    # Independent expectation: files 4, 9, 14, ... of the sorted list are held out, whole.
    held = [r for i, r in enumerate(kept) if i % 5 == 4]
    train = [r for i, r in enumerate(kept) if i % 5 != 4]
    assert bytes(a.heldout.to(torch.uint8).tolist()) == read(tmp_path, held)
    assert bytes(a.train.to(torch.uint8).tolist()) == read(tmp_path, train)
    assert a.info["files"] == 25 and a.info["heldout_files"] == 5
    assert a.info["sha256_heldout"] == hashlib.sha256(read(tmp_path, held)).hexdigest()
    assert b"SKIPPED" not in bytes(a.train.to(torch.uint8).tolist())
    assert a.info["python_version"] == ".".join(map(str, sys.version_info[:3]))


def test_validation_and_test_splits_are_whole_held_out_files(tmp_path):
    # The learning-rate pick reads valid, the reported number test: they must share no file.
    kept = make_tree(tmp_path)
    a, b = build_corpus(str(tmp_path), held_out_every=5), build_corpus(str(tmp_path), 5)
    assert torch.equal(a.valid, b.valid) and torch.equal(a.test, b.test)
    held = [r for i, r in enumerate(kept) if i % 5 == 4]  # m04, m09, m14, m19, m24 in sorted order
    assert bytes(a.valid.to(torch.uint8).tolist()) == read(tmp_path, held[0::2])
    assert bytes(a.test.to(torch.uint8).tolist()) == read(tmp_path, held[1::2])
    assert bytes(a.heldout.to(torch.uint8).tolist()) == read(tmp_path, held)
    assert (a.info["valid_files"], a.info["test_files"]) == (3, 2)
    assert a.info["sha256_test"] == hashlib.sha256(read(tmp_path, held[1::2])).hexdigest()


def test_corpus_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="root must be a directory"):
        build_corpus(str(tmp_path / "missing"))
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="need >= 2 \\* held_out_every=26"):
        build_corpus(str(tmp_path), held_out_every=13)
    with pytest.raises(ValueError, match="heldout_share must be in"):
        file_corpus(str(tmp_path / "m00.py"), heldout_share=1.0)


def test_file_corpus_holds_out_the_tail(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(100)))
    c = file_corpus(str(path), heldout_share=0.1)
    assert c.train.tolist() == list(range(90)) and c.heldout.tolist() == list(range(90, 100))
    assert c.valid.tolist() == list(range(90, 95)) and c.test.tolist() == list(range(95, 100))


def test_bits_per_byte_on_a_hand_made_case():
    # Uniform logits over 256 bytes cost exactly log2(256) = 8 bits per target.
    uniform = torch.zeros(3, 256)
    loss = F.cross_entropy(uniform, torch.tensor([0, 7, 255]), reduction="sum")
    assert bits_per_byte(float(loss), 3) == pytest.approx(8.0, abs=1e-6)
    # p = 1/2 and p = 1/8 on the targets: (1 + 3) / 2 = 2 bits per byte.
    probs = torch.full((2, 256), 1e-30)
    probs[0, 5], probs[0, 6] = 0.5, 0.5
    probs[1, 9], probs[1, 10] = 0.125, 0.875
    loss = F.cross_entropy(probs.double().log(), torch.tensor([5, 9]), reduction="sum")
    assert bits_per_byte(float(loss), 2) == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="num_bytes must be > 0"):
        bits_per_byte(1.0, 0)


def test_loss_by_position_bucket():
    # block 4: positions 0..3 are the first block, 8.. lie beyond 2 blocks, 4..7 in neither.
    pos = torch.tensor([0, 3, 4, 7, 8, 11])
    assert bucket_ids(pos, 4).tolist() == [0, 0, -1, -1, 1, 1]
    sums = LossSums()
    sums.add(torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 2.0]) * math.log(2), pos, block=4)
    assert sums.bits_per_byte() == pytest.approx(
        {"all": 18 / 6, "first_block": 2.0, "beyond_2_blocks": 2.0}
    )


def test_unigram_baseline():
    # Training bytes "aab": add-one counts a=3, b=2, 254 others 1 -> total 259.
    train, heldout = torch.tensor([97, 97, 98]), torch.tensor([97, 98])
    expect = -(math.log2(3 / 259) + math.log2(2 / 259)) / 2
    assert unigram_bits_per_byte(train, heldout) == pytest.approx(expect, rel=1e-12)
