"""Test settings shared by every test: offline, deterministic, small."""

import os

# Set before anything imports gradio or huggingface_hub: tests never touch the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses every connection."""
    import socket
    import urllib.error
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)  # torch.hub imported its own reference
    yield tmp_path / "torch_home" / "hub" / "checkpoints"
    torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))
