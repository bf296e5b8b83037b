"""`python -m raygpt.eval`: see raygpt.eval.driver."""

import sys

from raygpt.eval.driver import main

sys.exit(main())
