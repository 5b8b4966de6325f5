"""The names the API and the CLI accept, defined once and free of PyTorch (``vggkit --help`` imports them)."""

from __future__ import annotations

RELEASES = ("imagenet", "caffe", "timm")  # published weights by name: torchvision's, the Caffe ports, timm's
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("auto", "pil", "device")  # device: nvJPEG on CUDA, PIL where a file needs it
PROTOCOLS = ("center", "dense", "multicrop", "dense+multicrop")  # the paper's test protocols (Sec. 3.2, Table 5)
