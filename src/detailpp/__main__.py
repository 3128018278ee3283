"""``python -m detailpp`` = the ``detailpp`` command."""

import sys

from detailpp.cli import main

sys.exit(main())
