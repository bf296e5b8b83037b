"""``python -m raygpt.data``: see cli.py."""

import sys

from raygpt.data.cli import main

sys.exit(main())
