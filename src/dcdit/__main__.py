"""`python -m dcdit ...` = the `dcdit` command (useful when the venv's bin/ is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
