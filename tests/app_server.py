"""Import app.py and serve it on a free local port, for the app and browser tests."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
TEST_WIDTH = 1 / 16  # a thin vgg16: every view runs in well under a second


def load_app_module():
    """app.py as a module (it lives beside the package, not inside it)."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module
        spec.loader.exec_module(module)
    return sys.modules["app"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(blocks):
    """Serve a built app the way ``python app.py`` does, on 127.0.0.1 and a free port; yields its URL."""
    app_module = load_app_module()
    port = free_port()
    app_module.serve(blocks, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()
