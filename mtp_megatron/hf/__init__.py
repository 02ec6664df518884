"""Hugging Face transformers in and out (needs the ``[hf]`` extra: transformers, safetensors).

    python -m mtp_megatron.hf export --load CKPT --out DIR     # -> LlamaForCausalLM / GPT-NeoX
    python -m mtp_megatron.hf import --hf DIR --save CKPT --mtp-num-layers 1

Modules: ``architectures`` (which HF class, name tables), ``config_map`` (config.json),
``fused`` (QKV / SwiGLU layouts), ``convert`` (state dicts, MTP names), ``files``
(safetensors, shards, tokenizer), ``export``, ``importer``, ``cli``. See docs/hf.md.
"""
