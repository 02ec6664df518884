"""Training data: megatron-core GPT datasets and the microbatch iterators over them."""
