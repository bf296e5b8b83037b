"""`python -m raygpt.sweep`: see raygpt.sweep.driver."""

import sys

from raygpt.sweep.driver import main

sys.exit(main())
