"""`python -m so8t_hf.cli`: the `so8t-hf` command."""

import sys

from so8t_hf.cli.main import main

sys.exit(main())
