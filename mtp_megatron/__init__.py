"""mtp_megatron: pretrain GPT models with Multi-Token Prediction on megatron-core.

    torchrun launch/pretrain_gpt_mtp.py --mtp-num-layers 1
"""

import warnings

# megatron-core announces at import time that it falls back from apex/TE to torch
# implementations; that is expected on CPU and in plain containers, so keep it quiet.
for _pattern in (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
                 r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)

__version__ = "0.1.0"
