"""`python -m raygpt.service`: see raygpt.service.cli."""

import sys

from raygpt.service.cli import main

sys.exit(main())
