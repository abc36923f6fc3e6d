"""`python -m qtale_export.experiment RECIPE.yaml ...`: the same as `qtale experiment`."""
import sys

from ..cli import main

sys.exit(main(["experiment", *sys.argv[1:]]))
