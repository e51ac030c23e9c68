"""`python -m decoderkit.serve [MODEL_DIR] [--host ...]`: run the OpenAI-compatible server."""

import sys

from decoderkit.serve.app import main

sys.exit(main())
