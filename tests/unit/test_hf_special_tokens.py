"""An imported model exported again keeps its own ``bos``/``eos`` ids (issue 19 item 9).

A model directory without a tokenizer is imported with byte-level data flags (EOD 256);
its export used to write ``eos_token_id`` 256 and no ``bos`` instead of the model's own.
"""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.multirank  # saving a checkpoint starts dist_checkpointing workers


def test_import_then_export_keeps_the_models_special_tokens(tmp_path):
    from mtp_megatron.hf.export import export
    from mtp_megatron.hf.importer import import_hf
    from mtp_megatron.inference.loading import single_rank
    from tests.hf_models import save_tiny

    source = save_tiny("llama_mha_tied", tmp_path, bos_token_id=1, eos_token_id=2)
    assert not os.path.exists(os.path.join(source, "tokenizer.json"))
    with single_rank(seed=1234):
        import_hf(source, str(tmp_path / "ck"), mtp_num_layers=1)
        export(str(tmp_path / "ck"), str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    generation = json.load(open(tmp_path / "out" / "generation_config.json"))
    for exported in (config, generation):
        assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2), exported
