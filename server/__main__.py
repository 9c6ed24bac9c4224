import sys

from lookm_vllm.server.cli import main

sys.exit(main())
