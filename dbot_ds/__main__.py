"""`python -m dbot_ds ...` == `dbot-ds ...` (for machines where the package is on PYTHONPATH only)."""

import sys

from dbot_ds.cli import main

sys.exit(main())
