"""``python -m cxr_sr.client.viewer``: the same as the ``cxr-sr-viewer`` console script."""

import sys

from cxr_sr.client.viewer.cli import main

sys.exit(main())
