"""`python -m llmkit.bench [NAME ...]`: the same as `llmkit bench`."""
import sys

from . import main

sys.exit(main())
