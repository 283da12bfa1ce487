"""`python -m projects.feature_extraction ...`: the `cvt-extract` command."""

import sys

from projects.feature_extraction.extract import main

sys.exit(main())
