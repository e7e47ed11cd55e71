"""`python -m fl_merge`: the `fl-merge` command (fl_merge/cli/)."""

import sys

from fl_merge.cli import main

sys.exit(main())
