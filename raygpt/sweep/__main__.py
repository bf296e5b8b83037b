"""`python -m raygpt.sweep`: see raygpt.sweep.cli."""

import sys

from raygpt.sweep.cli import main

sys.exit(main())
