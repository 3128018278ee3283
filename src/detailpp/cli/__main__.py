"""``python -m detailpp.cli`` = the ``detailpp`` command."""

import sys

from detailpp.cli import main

sys.exit(main())
