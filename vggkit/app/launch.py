"""``vggkit app`` and ``python -m vggkit.app``: find the app and start it.

In a clone the app is ``app.py`` beside the package; an installed package carries the
same file (and the example photographs) as ``vggkit/_app/``. Both are run unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parents[1]  # vggkit/


# The installed copy exists only in an installed package; beside the package is a clone's app.py.
CANDIDATES = (PACKAGE / "_app" / "app.py", PACKAGE.parent / "app.py")


def app_file() -> Path:
    """The app.py this vggkit runs: the copy installed with the package, else the clone's."""
    for candidate in CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"The vggkit app is missing: none of {', '.join(map(str, CANDIDATES))} exists. "
                            f"Reinstall vggkit (pip install vggkit) or run python app.py in a clone.")


def load_app() -> ModuleType:
    """app.py as the module ``app`` (the name the tests and ``python app.py`` give it)."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", app_file())
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module
        spec.loader.exec_module(module)
    return sys.modules["app"]


def run_app(argv: list[str] | None = None) -> int:
    """Start the app with its own command-line options (``--port``, ``--model``, ...)."""
    return load_app().main(argv)


if __name__ == "__main__":
    sys.exit(run_app(sys.argv[1:]))
