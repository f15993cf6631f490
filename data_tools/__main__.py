import sys

from dbot_ds.data.tools.cli import main

sys.exit(main())
