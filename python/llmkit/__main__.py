"""`python -m llmkit ...` (what torchrun runs: ``torchrun --nproc_per_node 2 -m llmkit pretrain ...``)."""
import sys

from llmkit.cli import main

sys.exit(main())
