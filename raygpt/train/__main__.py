"""`python -m raygpt.train`: see raygpt.train.cli."""

import sys

from raygpt.train.cli import main

sys.exit(main())
