"""Generate from a checkpoint: greedy or MTP self-speculative decoding (one rank).

    python launch/generate_mtp.py --load runs/x/checkpoints --prompt "def main(" \
        --mode mtp-speculative --draft-depth 2 --max-new-tokens 128

Same as ``python -m mtp_megatron.generate``; see ``--help`` and docs/speculative-decoding.md.
"""

import sys

from mtp_megatron.generate import main

if __name__ == "__main__":
    sys.exit(main())
