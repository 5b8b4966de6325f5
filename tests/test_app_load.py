"""app.py run as a user runs it, abused: bad uploads and a burst of 20 concurrent requests.

Every request ends in a result or vggkit's own reason, the server stays up, and its
memory stays under 2 GB. The server is a separate process, so a crash fails the test.
"""

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_server import EXAMPLES, TEST_WIDTH, app_process, peak_rss_bytes

CAT = str(EXAMPLES / "chelsea.jpg")
GIGABYTE = 1024 ** 3
BURST = 20
BURST_TIMEOUT_S = 300  # a busy 2-core machine; the burst itself takes seconds


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in 57 bytes: a decompression bomb's header and nothing else."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server():
    with app_process("--model", "vgg16", "--weights", "none", "--width", str(TEST_WIDTH)) as running:
        yield running


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "notes.jpg").write_text("a shopping list, not a picture")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    Image.new("RGB", (10000, 2), (90, 140, 200)).save(folder / "wide.png")
    Image.new("RGB", (2, 10000), (90, 140, 200)).save(folder / "tall.png")
    return folder


def reason(call) -> str:
    """The message an AppError carries (the test fails if the call succeeds)."""
    with pytest.raises(AppError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize("name, expected", [
    ("notes.jpg", "not an image"),
    ("empty.jpg", "not an image"),
    ("bomb.png", "decompression bomb"),
])
def test_bad_uploads_get_vggkits_message(server, uploads, name, expected):
    _, url = server
    client = Client(url, verbose=False)
    for endpoint, args in (("/score_maps", (["256"],)), ("/feature_maps", ("pool1", 4)),
                           ("/receptive_field", ("D", "conv3_3"))):
        message = reason(lambda: client.predict(handle_file(str(uploads / name)), *args, api_name=endpoint))
        assert message.startswith(f"{name}: ") and expected in message, (endpoint, message)
        assert "upstream Gradio app" not in message and "/tmp" not in message


def test_an_extreme_aspect_ratio_is_refused_by_dense_views_and_cropped_by_the_others(server, uploads):
    process, url = server
    client = Client(url, verbose=False)
    for name in ("wide.png", "tall.png"):
        image = handle_file(str(uploads / name))
        message = reason(lambda: client.predict(image, ["224", "512"], api_name="/score_maps"))
        assert "above the limit of 1,000,000 pixels" in message and "crop it" in message, message
        grid, info = client.predict(image, "pool1", 4, api_name="/feature_maps")  # the centre square, resampled
        assert ["input", "224 x 224 centre crop"] in info["data"]
    assert process.poll() is None
    assert peak_rss_bytes(process.pid) < 2 * GIGABYTE


def test_a_burst_of_20_concurrent_requests_is_queued_and_answered(server, uploads):
    process, url = server
    cat, text = handle_file(CAT), handle_file(str(uploads / "notes.jpg"))
    requests = [
        ((cat, ["224", "256"]), "/score_maps"),
        ((cat, "D", "conv4_3"), "/receptive_field"),
        ((cat, "pool2", 8), "/feature_maps"),
        ((cat, ["224"], "281"), "/score_map_of_class"),
        ((text, "pool1", 4), "/feature_maps"),  # one bad upload among them gets its reason
    ]
    # The burst checks that every request is answered; fetching the answers' image files at once is
    # the client's own traffic, so it is left out here (the request after the burst fetches its files).
    client = Client(url, verbose=False, download_files=False)
    jobs = [client.submit(*args, api_name=endpoint) for args, endpoint in
            (requests[i % len(requests)] for i in range(BURST))]

    def outcome(job):
        try:
            return "answered", job.result(timeout=BURST_TIMEOUT_S)
        except AppError as error:
            return "refused", str(error)

    with ThreadPoolExecutor(BURST) as pool:
        futures = [pool.submit(outcome, job) for job in jobs]
        done, pending = wait(futures, timeout=BURST_TIMEOUT_S)
    assert not pending, f"{len(pending)} of {BURST} requests unanswered after {BURST_TIMEOUT_S} s"
    results = [future.result() for future in futures]
    refused = [message for kind, message in results if kind == "refused"]
    assert len(results) == BURST and len(refused) == BURST // len(requests)
    assert all(message.startswith("notes.jpg: not an image") for message in refused), refused
    answered = [value for kind, value in results if kind == "answered"]
    assert all(value[-1] == "281: tabby" for value in answered[3::4])  # the class asked for, by index
    # Still serving afterwards, in the same process.
    assert process.poll() is None
    _, _, _, label = Client(url, verbose=False).predict(cat, ["224"], "tabby", api_name="/score_map_of_class")
    assert label == "281: tabby"
    assert httpx.get(url, timeout=10).status_code == 200
    assert peak_rss_bytes(process.pid) < 2 * GIGABYTE
