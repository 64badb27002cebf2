import sys

from distllm.entrypoints.cli import main

sys.exit(main())
