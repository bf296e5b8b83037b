"""`python -m raygpt.cluster`: see raygpt.cluster.ray_up."""

import sys

from raygpt.cluster.ray_up import main

sys.exit(main())
