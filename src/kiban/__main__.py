"""``python -m kiban``: the ``kiban`` command."""

import sys

from kiban._cli import main

sys.exit(main())
