"""``python -m xmodal`` == ``xmodal``."""

import sys

from xmodal.cli import main

sys.exit(main())
