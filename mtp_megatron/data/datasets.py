"""Build megatron-core GPT datasets for training.

With ``--mock-data`` the samples come from megatron-core's ``MockGPTDataset``: documents
of consecutive token ids ``1, 2, 3, ...`` ending in an end-of-document token, which a
model (and every MTP depth) can learn, so a falling loss means the stack works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizer

logger = logging.getLogger(__name__)

MOCK_VOCAB_SIZE = 512


def mock_tokenizer(vocab_size: int = MOCK_VOCAB_SIZE):
    """megatron-core's null tokenizer: ids 0..vocab_size-2, EOD = vocab_size - 1."""
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                             vocab_size=vocab_size - 1)


def build_mock_datasets(
    *, seq_length: int, seed: int, num_train_samples: int, vocab_size: int,
    is_built_on_rank: Callable[[], bool] = lambda: True,
):
    """Train dataset of ``num_train_samples`` mock samples (validation/test: none)."""
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=mock_tokenizer(vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [num_train_samples, 0, 0], is_built_on_rank, config
    ).build()
    return train


@dataclass(frozen=True)
class Datasets:
    train: object
    valid: Optional[object] = None
