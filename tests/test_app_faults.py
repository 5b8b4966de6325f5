"""The app's open doors, closed: every refusal has a reason, images are uploads only, a burst of 50 stays
within a memory bound, and every view's work fits its time budget.

Malformed requests go to the served app (in this process, so its sockets can be watched) over Gradio's
HTTP API and through gradio_client; the burst goes to `python app.py` as its own process, whose peak
resident memory (VmHWM) is its own.
"""

import functools
import json
import math
import socket
from concurrent.futures import ThreadPoolExecutor

import gradio.processing_utils
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_server import EXAMPLES, TEST_WIDTH, app_process, load_app_module, peak_rss_bytes, served

app_module = load_app_module()
views = app_module.views
CAT = str(EXAMPLES / "chelsea.jpg")
META = {"_type": "gradio.FileData"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
BURST = 50
# The thin app idles at 0.86 GB (torch, Gradio, matplotlib); this burst takes it to 1.01 GB, four of them to
# 1.08 GB (README, "Robustness and security"). Before the per-thread malloc arenas were capped and old
# figures collected, one burst added 0.41 GB and each further one 0.2 GB more.
BURST_PEAK_BOUND = 1.3 * 1024 ** 3
BURST_GROWTH_BOUND = 0.3 * 1024 ** 3
BURST_TIMEOUT_S = 240  # a busy 2-core machine; the burst itself takes about 30 s


def file_data(path: str, **fields) -> dict:
    """An image parameter as gradio_client sends an uploaded file."""
    return {"path": path, "meta": META, **fields}


@pytest.fixture(scope="module")
def blocks():
    return app_module.build_app("vgg16", "none", TEST_WIDTH)


@pytest.fixture(scope="module")
def server(blocks):
    """The thin app served from this process on 127.0.0.1; yields its URL."""
    with served(blocks) as url:
        yield url


@pytest.fixture(scope="module")
def cat_upload(server) -> dict:
    """The cat photograph uploaded as a browser uploads it: the FileData of a file in Gradio's upload folder."""
    with open(CAT, "rb") as photo:
        response = http().post(server + "gradio_api/upload", files={"files": ("chelsea.jpg", photo)})
    response.raise_for_status()
    return file_data(response.json()[0], orig_name="chelsea.jpg")


@functools.cache
def http() -> httpx.Client:
    """One HTTP client for the whole file (a new one per request spends 0.5 s on its TLS context)."""
    return httpx.Client(timeout=120)


def call(url: str, api_name: str, data: list) -> tuple[str, object]:
    """One request over Gradio's HTTP API: ("complete", outputs) or ("error", the error's text)."""
    # json.dumps writes NaN and Infinity as JSON extensions, as a careless client does; Gradio reads them.
    posted = http().post(f"{url}gradio_api/call/{api_name}", content=json.dumps({"data": data}),
                         headers={"content-type": "application/json"})
    posted.raise_for_status()
    stream = http().get(f"{url}gradio_api/call/{api_name}/{posted.json()['event_id']}").text
    event, _, payload = [block for block in stream.split("\n\n") if block.strip()][-1].partition("\ndata: ")
    outcome = json.loads(payload)
    if event == "event: error":
        return "error", outcome.get("error") if isinstance(outcome, dict) else outcome
    return "complete", outcome


def refusal(url: str, api_name: str, data: list) -> str:
    """The reason the server gives for refusing a request (the test fails if it answers instead)."""
    kind, outcome = call(url, api_name, data)
    assert kind == "error", f"/{api_name} answered {str(outcome)[:200]}"
    return outcome


UPLOAD = object()  # stands for the uploaded cat in the table below
MALFORMED = [
    # bad image payloads
    ("receptive_field", [file_data("/etc/passwd"), "D", "conv3_3"], "'/etc/passwd' is not one of its uploads"),
    ("receptive_field", [{"path": "/etc/passwd"}, "D", "conv3_3"], "'/etc/passwd' is not one of its uploads"),
    ("feature_maps", [file_data("../../etc/hostname"), "pool1", 4], "is not one of its uploads"),
    ("score_maps", ["chelsea.jpg", ["256"]], "must be a file uploaded to this app"),
    ("score_maps", [{"url": "chelsea.jpg"}, ["256"]], "must be a file uploaded to this app"),
    ("feature_maps", [file_data("data:image/png;base64,iVBORw0KGgo="), "pool1", 4], "not given as a link"),
    # wrong types, out-of-range numbers, NaN
    ("compare_stacks", ["sixty-four", 3, 56], "Channels C (in and out) must be a number from 1 to 512"),
    ("compare_stacks", [64, 0, 56], "Stack depth n must be a number from 1 to 5; got 0."),
    ("compare_stacks", [64, 3, True], "Input size (px) must be a number from 8 to 112; got True."),
    ("compare_stacks", [math.nan, 3, 56], "Channels C (in and out) must be a number from 1 to 512; got nan."),
    ("measure_stacks", [513, 3, 56], "Channels C (in and out) must be a number from 1 to 512; got 513."),
    ("measure_stacks", [64, 2.5, 56], "Stack depth n must be a whole number from 1 to 5, not 2.5."),
    ("receptive_field_at", [UPLOAD, "D", "conv3_3", "left", 10], "x on the picture must be a number from 0 to 448"),
    ("receptive_field_at", [UPLOAD, "D", "conv3_3", 10, math.inf], "y on the picture must be a number from 0 to 448"),
    ("feature_maps", [UPLOAD, "pool1", 6.5], "Channels shown must be a whole number from 1 to 32, not 6.5."),
    ("score_maps", [UPLOAD, "256"], "Test scales Q must be a list of some of 224, 256"),
    ("score_maps", [UPLOAD, [256]], "Test scales Q must be a list of some of 224, 256"),
    ("score_map_of_class", [UPLOAD, ["224"], {"class": 281}], "Class to map must be text of at most 200 characters"),
    ("score_map_of_class", [UPLOAD, ["224"], "tabby" * 100], "Class to map must be text of at most 200 characters"),
    # missing or extra values
    ("receptive_field", [UPLOAD, "D"], "/receptive_field takes 3 values"),
    ("feature_maps", [UPLOAD, "pool1", 4, "extra"], "/feature_maps takes 3 values"),
    ("score_maps", [UPLOAD, None], "Test scales Q must be a list of some of"),
    ("compare_stacks", [None, 3, 56], "Channels C (in and out) must be a number from 1 to 512; got nothing."),
    ("receptive_field_config", [None, "conv3_3"], "Configuration must be one of A, A-LRN, B, C, D, E; got nothing."),
    # unknown configuration, layer and class names
    ("receptive_field", [UPLOAD, "vgg99", "conv3_3"], "Configuration must be one of A, A-LRN, B, C, D, E; got 'vgg99'."),
    ("receptive_field", [UPLOAD, "D", "fc7"], "Layer must be one of conv1_1, conv1_2, pool1"),
    ("feature_maps", [UPLOAD, "conv9_9", 4], "Layer must be one of conv1_1"),
    ("score_map_of_class", [UPLOAD, ["224"], "zebrafish"], "No class is named 'zebrafish'"),
    ("score_map_of_class", [UPLOAD, ["224"], "1000"], "Class 1000 is out of range"),
]


def test_every_malformed_request_is_refused_with_a_reason_and_the_server_goes_on(server, cat_upload):
    assert len(MALFORMED) >= 20 and {api for api, _, _ in MALFORMED} == {e.strip("/") for e in views_endpoints()}
    for api_name, data, expected in MALFORMED:
        message = refusal(server, api_name, [cat_upload if value is UPLOAD else value for value in data])
        assert message and expected in message, (api_name, data, message)
        assert "\n" not in message and message.endswith("."), message  # one sentence
        assert "/tmp" not in message, message  # no server path the client did not send
    # Still serving, in the same process.
    kind, (top5, *_) = call(server, "score_maps", [cat_upload, ["224"]])
    assert kind == "complete" and len(top5["data"]) == 5


def views_endpoints() -> set[str]:
    """The app's named endpoints, as test_app.py lists them."""
    return {"/receptive_field", "/receptive_field_config", "/receptive_field_at", "/compare_stacks",
            "/measure_stacks", "/score_maps", "/score_map_of_class", "/feature_maps"}


def test_gradio_client_sees_the_reason_not_a_generic_error(server, cat_upload, tmp_path):
    client = Client(server, verbose=False)
    for args, api_name, expected in [
        ((handle_file(CAT), "D", "conv3_3", -5, 10), "/receptive_field_at", "x on the picture must be a number"),
        ((64, 9, 56), "/measure_stacks", "Stack depth n must be a number from 1 to 5; got 9."),
        ((handle_file(CAT), ["224"], "terrier"), "/score_map_of_class", "'terrier' matches 19 classes"),
    ]:
        with pytest.raises(AppError) as error:
            client.predict(*args, api_name=api_name)
        assert expected in str(error.value) and "upstream Gradio app" not in str(error.value), str(error.value)


def test_a_private_event_without_its_event_data_gets_a_reason(blocks, server):
    index = next(i for i, fn in blocks.fns.items() if fn.name == "clicked")
    session = "faults-private"
    joined = http().post(server + "gradio_api/queue/join", json={"data": [], "fn_index": index,
                                                                  "session_hash": session, "event_data": None})
    joined.raise_for_status()
    stream = http().get(server + f"gradio_api/queue/data?session_hash={session}").text
    completed = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
    output = next(m for m in completed if m.get("msg") == "process_completed")["output"]
    assert "A click must give the position clicked on the picture" in (output.get("error") or ""), output


@pytest.fixture
def outbound(monkeypatch):
    """Every DNS lookup and TCP connection this process tries to a host other than this machine, refused.

    The server runs in this process, so a URL fetch on a client's behalf would show here.
    """
    attempts: list[tuple[str, object]] = []
    real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def remote(host) -> bool:
        return str(host) not in LOCAL_HOSTS

    def getaddrinfo(host, *args, **kwargs):
        if remote(host):
            attempts.append(("lookup", host))
            raise socket.gaierror(socket.EAI_NONAME, "test: no name lookups off this machine")
        return real_getaddrinfo(host, *args, **kwargs)

    def lookup(host, *args, **kwargs):
        attempts.append(("lookup", host))
        raise socket.gaierror(socket.EAI_NONAME, "test: no name lookups off this machine")

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and remote(address[0]):
                attempts.append(("connect", address))
                raise OSError("test: no connections off this machine")
            return real(sock, address)
        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, lookup)
    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    return attempts


def test_the_watch_catches_gradios_url_fetch(outbound, tmp_path):
    # The control: Gradio's own download (what an image given as a URL reached) is seen and stopped here.
    with pytest.raises(Exception):
        gradio.processing_utils.ssrf_protected_download("http://images.example.com/cat.jpg", str(tmp_path))
    assert ("lookup", "images.example.com") in outbound


def test_image_parameters_take_uploads_only_and_the_server_fetches_nothing(server, cat_upload, outbound):
    links = ["http://images.example.com/cat.jpg", "https://93.184.216.34/cat.jpg", "http://[2606:2800::1]/x.png"]
    requests = []
    for link in links:
        requests += [
            ("receptive_field", [file_data(link, url=link, orig_name="cat.jpg"), "D", "conv3_3"]),
            ("score_maps", [file_data(link), ["256"]]),
            ("feature_maps", [{**cat_upload, "url": link}, "pool1", 4]),  # a real upload with a foreign url
        ]
    for api_name, data in requests:
        assert "not given as a link" in refusal(server, api_name, data)
    client = Client(server, verbose=False)
    for api_name, args in [("/receptive_field", ("D", "conv3_3")), ("/score_maps", (["256"],)),
                           ("/feature_maps", ("pool1", 4))]:
        with pytest.raises(AppError, match="not given as a link"):
            client.predict(handle_file(links[0]), *args, api_name=api_name)
    assert outbound == [], outbound
    # An upload still works, with the url the browser sends beside its path.
    browser_url = f"{server}gradio_api/file={cat_upload['path']}"
    kind, outputs = call(server, "feature_maps", [{**cat_upload, "url": browser_url}, "pool1", 4])
    assert kind == "complete" and ["input", "224 x 224 centre crop"] in outputs[1]["data"]


@pytest.fixture(scope="module")
def burst_requests(tmp_path_factory) -> list[tuple[str, list[str]]]:
    """50 different photographs (noise over the cat, so no two share a cache entry) with their test scales:
    every tenth 1950 x 512 at Q = 512 (998,400 pixels, just inside the dense limit), the others small."""
    folder = tmp_path_factory.mktemp("burst")
    rng = np.random.default_rng(0)
    cat = np.asarray(Image.open(CAT).convert("RGB"), dtype=np.int16)
    requests = []
    for i in range(BURST):
        size, scales = ((1950, 512), ["512"]) if i % 10 == 0 else ((300, 224), ["224"])
        noise = rng.integers(-12, 13, size=cat.shape, dtype=np.int16)
        path = folder / f"photo{i:02d}.jpg"
        Image.fromarray(np.clip(cat + noise, 0, 255).astype(np.uint8)).resize(size).save(path, quality=90)
        requests.append((str(path), scales))
    return requests


def test_heavy_views_share_one_queue_slot(blocks, server):
    heavy = {fn.name for fn in blocks.fns.values() if fn.concurrency_id == "heavy"}
    assert heavy == {"receptive_field", "measure_stacks", "score_maps", "feature_maps"}
    assert all(fn.concurrency_limit == "default" for fn in blocks.fns.values() if fn.concurrency_id == "heavy")
    assert blocks._queue.default_concurrency_limit == 1 and blocks._queue.max_size == app_module.MAX_QUEUE
    assert blocks.state_session_capacity == app_module.MAX_SESSIONS


def test_a_burst_of_50_score_map_requests_stays_within_the_memory_bound(burst_requests):
    with app_process("--model", "vgg16", "--weights", "none", "--width", str(TEST_WIDTH)) as (process, url):
        idle = peak_rss_bytes(process.pid)
        # A patient client: on a busy machine an upload behind 49 others can take longer than its 20 s default.
        client = Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": BURST_TIMEOUT_S})
        jobs = [client.submit(handle_file(path), scales, api_name="/score_maps") for path, scales in burst_requests]

        def outcome(job):
            try:
                return job.result(timeout=BURST_TIMEOUT_S)[-1]
            except AppError as error:
                return f"refused: {error}"

        with ThreadPoolExecutor(BURST) as pool:
            labels = list(pool.map(outcome, jobs, timeout=BURST_TIMEOUT_S))
        assert len(labels) == BURST and not [label for label in labels if label.startswith("refused")], labels
        assert process.poll() is None and httpx.get(url, timeout=10).status_code == 200
        peak = peak_rss_bytes(process.pid)
        print(f"burst of {BURST}: idle {idle / 1024 ** 2:.0f} MB, peak {peak / 1024 ** 2:.0f} MB")
        assert peak < BURST_PEAK_BOUND and peak - idle < BURST_GROWTH_BOUND, (idle, peak)


def test_the_score_map_cache_is_bounded_by_size():
    cache = views.ByteBoundedCache(10_000)
    for i in range(40):
        cache.put(i, torch.zeros(500))  # 2,000 bytes each
    assert cache.bytes == 10_000 and cache.get(0) is None and cache.get(39) is not None
    cache.put("huge", torch.zeros(5_000))  # larger than the whole cache: not kept, nothing dropped
    assert cache.get("huge") is None and cache.bytes == 10_000


def test_measure_stacks_at_the_sliders_maxima_answers():
    channels, depth, size = (high for _, high in (views.STACK_CHANNELS, views.STACK_DEPTH, views.STACK_SIZE))
    table = views.stack_measurement(channels, depth, size)
    assert table["module"].tolist() == ["5 x conv3x3", "1 x conv11x11"]
    assert table["parameters (counted)"].tolist() == [f"{5 * (9 * 512 ** 2 + 512):,}", f"{121 * 512 ** 2 + 512:,}"]
    assert table["receptive field (measured, px)"].tolist() == [11, 11]
    (timing,) = [column for column in table.columns if column.startswith("forward at")]
    assert (table[timing] > 0).all()


def test_the_stacks_timing_plan_fits_its_budget():
    # 0.1 ns per multiply-add: one forward of both designs at 112 px is 55 s, so they are timed at 40 px
    # (2 x 55 s x (40 / 112)^2 = 14 s fits 20 s; 48 px would take 20.2 s).
    assert views.stack_timing_plan(512, 5, 112, budget_s=20, rate=1e-10) == (40, 1)
    assert views.stack_timing_plan(64, 3, 56, budget_s=20, rate=1e-10) == (56, 5)  # 0.1 s: the full 5 repeats
    assert views.stack_timing_plan(512, 5, 112, budget_s=20, rate=1e-6) == (8, 1)  # the smallest size at worst
    with pytest.raises(ValueError, match="Input size must be a whole number from 8 to 112, not 120."):
        views.stack_measurement(64, 3, 120)


def test_score_maps_that_cannot_finish_in_the_budget_are_refused_before_they_run(monkeypatch):
    network = views.load_demo_model("vgg16", "none", TEST_WIDTH)
    network.score_maps_view(CAT, ["224"])  # one pass: the speed is learned
    assert network._seconds_per_pixel is not None
    monkeypatch.setattr(network, "_seconds_per_pixel", 1e-3)  # a machine 1000 s per megapixel slow
    monkeypatch.setattr(network, "_compute_score_map", lambda *args: pytest.fail("a pass ran past the estimate"))
    with pytest.raises(TimeoutError, match=r"would take about \d+ s more on this machine, past the budget of 120 s"):
        network.score_maps_view(CAT, ["256", "384"])
    assert network.score_maps_view(CAT, ["224"]).top5 is not None  # the cached scale still answers at once
