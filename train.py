"""The main job: `accelerate launch train.py [config.yaml] [key=value ...]` (or torchrun, or plain python).

With no arguments it trains the embedded default, a small byte-level transformer language model on
this Python's standard-library sources (nothing downloaded). See `acctrain --help` for every key.
"""

import sys

from acctrain.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
