"""`python -m projects.deploy ...`: the `cvt-export` command."""

import sys

from projects.deploy.export import main

sys.exit(main())
