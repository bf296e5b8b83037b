"""`python -m raygpt.mup`: see raygpt.mup.driver."""

import sys

from raygpt.mup.driver import main

sys.exit(main())
