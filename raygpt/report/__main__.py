"""`python -m raygpt.report`: see raygpt.report.driver."""

import sys

from raygpt.report.driver import main

sys.exit(main())
