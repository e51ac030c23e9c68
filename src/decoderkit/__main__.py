"""`python -m decoderkit`: the same command as `decoderkit` (see `decoderkit.cli`)."""

import sys

from decoderkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
