"""The padded vocabulary a resumed model is built with (pure Python; issue 19 item 1).

A TP change kept the checkpoint's weights but padded the vocabulary for the new TP
(384 -> 512 rows for the byte-level 258 at TP 2): fresh rows took probability mass and
the resumed loss jumped by 0.38 nats. ``rows_for`` keeps the checkpoint's rows when the
new TP splits them, and otherwise grows them with the new rows masked.
"""

import pytest

from mtp_megatron.checkpoint.vocab import VocabRows, rows_for
from mtp_megatron.model.padding import dead_columns


def test_a_fresh_run_pads_for_its_tp():
    assert rows_for(None, vocab_size=258, divisible_by=128, tp=2) == VocabRows(512, 512)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_a_resume_keeps_the_checkpoints_rows_when_tp_splits_them(tp):
    saved = {"vocab_size": 258, "padded_vocab_size": 384, "live_rows": 384}
    assert rows_for(saved, vocab_size=258, divisible_by=128, tp=tp) == VocabRows(384, 384)
    # the same from a TP 2 run's 512 rows back to TP 1
    saved = {"vocab_size": 258, "padded_vocab_size": 512}
    assert rows_for(saved, vocab_size=258, divisible_by=128, tp=1) == VocabRows(512, 512)


def test_rows_tp_cannot_split_grow_and_the_new_ones_are_dead():
    saved = {"vocab_size": 257, "padded_vocab_size": 257}
    rows = rows_for(saved, vocab_size=257, divisible_by=1, tp=2)
    assert rows == VocabRows(258, 257) and rows.masked == 1
    assert rows_for(saved, vocab_size=257, divisible_by=64, tp=2) == VocabRows(384, 257)
    # resumed again (its checkpoint says where the live rows end): still masked
    again = {"vocab_size": 257, "padded_vocab_size": 258, "live_rows": 257}
    assert rows_for(again, vocab_size=257, divisible_by=1, tp=1) == VocabRows(258, 257)


def test_another_vocabulary_is_left_to_the_load_to_refuse():
    saved = {"vocab_size": 300, "padded_vocab_size": 384}
    assert rows_for(saved, vocab_size=258, divisible_by=128, tp=2) == VocabRows(512, 512)


def test_weights_only_checkpoints_record_rows_without_a_vocabulary():
    saved = {"vocab_size": None, "padded_vocab_size": 384, "live_rows": 384}
    assert rows_for(saved, vocab_size=258, divisible_by=128, tp=2) == VocabRows(384, 384)


@pytest.mark.parametrize("local,padded,live,rank,expected", [
    (129, 258, 257, 1, slice(128, 129)),   # TP 2: the last rank holds row 257
    (129, 258, 257, 0, slice(129, 129)),   # the first holds none
    (258, 258, 257, 0, slice(257, 258)),   # gathered logits
    (96, 384, 258, 2, slice(66, 96)),      # TP 4, 384 rows, 258 live
    (96, 384, 258, 3, slice(0, 96)),
])
def test_dead_columns_of_each_tp_rank(local, padded, live, rank, expected):
    assert dead_columns(local, padded, live, rank) == expected
