"""The theta policy's old import path: `qtale_export.theta` is `qtale_export.deploy.theta` (one
module object), for the torch-side modules that still import it by that name."""
import sys

from .deploy import theta

sys.modules[__name__] = theta
