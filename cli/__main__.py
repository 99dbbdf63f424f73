"""``python -m silomesh.cli``: the same as the ``silomesh`` console script."""

from __future__ import annotations

import sys

from silomesh.cli import main

sys.exit(main())
