"""The megatron-core GPT + MTP model: configuration, specs, construction and counting."""
