"""`python -m qtale_export.cli ...` (e.g. under torchrun): the same program as `qtale`."""
import sys

from . import main

sys.exit(main())
