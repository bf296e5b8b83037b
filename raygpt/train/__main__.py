"""`python -m raygpt.train`: see raygpt.train.driver."""

import sys

from raygpt.train.driver import main

sys.exit(main())
