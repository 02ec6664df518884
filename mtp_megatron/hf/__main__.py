"""``python -m mtp_megatron.hf``: see :mod:`mtp_megatron.hf.cli`."""

import sys

from mtp_megatron.hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
