"""``python -m vggkit.app``: the demo, as ``python app.py`` in a clone."""

import sys

from .launch import run_app

sys.exit(run_app(sys.argv[1:]))
