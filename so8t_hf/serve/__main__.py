"""`python -m so8t_hf.serve --help`: the same as `so8t-hf serve`."""

import sys

from so8t_hf.serve.cli import main

sys.exit(main())
