"""``python -m lookm_vllm.eval`` = ``lookm-eval``."""

import sys

from .cli import main

sys.exit(main())
