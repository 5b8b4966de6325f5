"""The vggkit app: how a VGG network sees. Gradio layout and wiring only; vggkit.app.demo computes.

    python app.py [--host 127.0.0.1] [--port 7860] [--model vgg16] [--weights imagenet|timm|caffe|PATH|none]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import gc
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit


def fewer_malloc_arenas(arenas: int = 1) -> None:
    """Cap glibc's malloc arenas (default 8 per core) before any worker thread starts; elsewhere nothing.

    Gradio runs each request on one of 40 worker threads, and each thread's arena kept the freed pages of
    the images, maps and figures it handled: the thin app's peak grew 100 MB with every burst of 50
    requests, and stopped growing with one arena (one heavy request runs at a time: no lock to contend
    for). ``MALLOC_ARENA_MAX`` in the environment wins.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX in malloc.h; a libc without it (musl) has no mallopt
    except (OSError, AttributeError):
        pass


fewer_malloc_arenas()

# Before gradio is imported: no analytics, no hub look-ups. The app runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import gradio as gr  # noqa: E402
from gradio.block_function import BlockFunction  # noqa: E402
from gradio.data_classes import ImageData  # noqa: E402
from gradio.state_holder import SessionState  # noqa: E402
from gradio.utils import get_upload_folder, is_in_or_equal  # noqa: E402

from vggkit.app import demo as views  # noqa: E402
from vggkit.cli import positive_float  # noqa: E402
from vggkit.models.configs import PAPER_CONFIGS  # noqa: E402

EXAMPLES = [str(p) for p in sorted((Path(__file__).resolve().parent / "assets" / "examples").glob("*.jpg"))]
DEFAULT_EXAMPLE = next((p for p in EXAMPLES if p.endswith("chelsea.jpg")), EXAMPLES[0] if EXAMPLES else None)
# Strings, as the API advertises them: a client sends back exactly what view_api() lists.
SCALE_CHOICES = ["224", "256", "288", "320", "384", "448", "512"]
DEFAULT_SCALES = ["256", "384"]
MAX_FILE_SIZE = "10mb"
MAX_QUEUE = 64  # requests waiting beyond this are refused with Gradio's "queue is full", not left to pile up
# The heavy views (receptive field, class score maps, feature maps, the stacks' measurement) share one queue
# slot: on a CPU two passes at once only split the same cores, and one at a time bounds the memory by the
# largest single request (a 1 MP dense pass) instead of the sum over the views.
HEAVY = {"concurrency_id": "heavy"}
# Gradio keeps each browser session's last inputs and outputs (0.3 MB for a score map, measured; up to ~1 MB
# with every tab's figures) for its 10,000 most recent sessions by default: up to GBs held for clients gone.
MAX_SESSIONS = 256
MAX_TEXT = 200  # characters in the class box: longer than any class name
FILE_DATA = {"_type": "gradio.FileData"}
CSS = "#untrained-banner {background: #fff4d6; border: 2px solid #e0a000; border-radius: 8px; padding: 4px 12px;}"

INTRO = """# vggkit: how a VGG network sees
Simonyan & Zisserman, *Very Deep Convolutional Networks for Large-Scale Image Recognition* (ICLR 2015).
Stacks of 3x3 convolutions, receptive fields that grow with depth, and a classifier that turns into a
fully-convolutional network at test time. Everything here runs on this machine, offline."""


def user_errors(callback):
    """Answer every failure of a view with vggkit's one-line message in the app; the server goes on serving."""

    @functools.wraps(callback)
    def wrapped(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - one request's failure must never reach the server
            if not isinstance(error, (ValueError, TimeoutError)):  # unexpected: keep the traceback in the log
                logging.getLogger("vggkit.app").exception("%s failed", callback.__name__)
            raise gr.Error(views.describe_error(error), print_exception=False) from None

    return wrapped


def heavy_view(callback: Callable) -> Callable:
    """``user_errors`` for a heavy view, which first collects the garbage earlier answers left.

    Their matplotlib figures (a score-map overlay holds the photograph, its heatmap and a rendered canvas)
    sit in reference cycles that Python's collector rarely reaches on its own in a heap this large: 40
    score-map views grew a process by 90 MB without this and not at all with it (four bursts of 50 on the
    thin app: a 1.18 GB peak, 1.12 GB with it). ``serve`` freezes the startup objects, so a collection
    looks at the requests' objects only (milliseconds, not the second a full collection takes).
    """
    @functools.wraps(callback)
    def collected(*args, **kwargs):
        gc.collect()
        return callback(*args, **kwargs)

    return user_errors(collected)


def shown(value: object) -> str:
    """A client's value as a refusal quotes it: short, and "nothing" for a missing one."""
    text = "nothing" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (text, true/false, NaN, infinities, 1e400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def local_upload_url(url: object, path: str) -> bool:
    """Whether a FileData ``url`` is what the browser sends with an upload: this server's link to ``path``."""
    if url is None:
        return True
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https", "") and any(
        link.endswith("/file=" + path) for link in (parts.path, unquote(parts.path)))


def upload_problem(value: object) -> str | None:
    """Why an image payload is not a file uploaded to this app, or None (no image is fine: the views say so).

    Checked before Gradio's preprocessing, which would fetch an http(s) path from the network (a lookup and
    a connection on a client's behalf), and passes a path without Gradio's meta field to the view as it is.
    """
    if value is None:
        return None
    how = "upload it first (gradio_client: handle_file('photo.jpg'))"
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        return f"The image must be a file uploaded to this app; {how}, not {shown(value)}."
    path, url = value["path"], value.get("url")
    link = path if "://" in path or path.startswith("data:") else None if local_upload_url(url, path) else url
    if link is not None:
        return f"The image must be uploaded to this app, not given as a link ({shown(link)}); it fetches nothing."
    if value.get("meta") != FILE_DATA or value.get("is_stream") or not uploaded(path):
        return f"The image must be a file uploaded to this app; {how}: {shown(path)} is not one of its uploads."
    return None


def uploaded(path: str) -> bool:
    """Whether ``path`` lies in Gradio's upload folder (links resolved: none leads out of it)."""
    try:
        return is_in_or_equal(path, get_upload_folder())
    except (ValueError, OSError):  # a NUL byte, a name too long: no upload's path
        return False


def number_problem(component: gr.Slider | gr.Number, value: object, required: bool) -> str | None:
    """Why ``value`` is no number within ``component``'s range, or None."""
    if value is None and not required:
        return None
    low, high = component.minimum, component.maximum
    number = as_number(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        span = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
        return f"{component.label} must be a number{span}; got {shown(value)}."
    return None


def choice_problem(component: gr.Dropdown | gr.CheckboxGroup, value: object) -> str | None:
    """Why ``value`` is not among ``component``'s choices (several for a checkbox group), or None."""
    values = [choice for _, choice in component.choices]
    if isinstance(component, gr.CheckboxGroup):
        if not isinstance(value, list) or not all(isinstance(v, str) and v in values for v in value):
            return f"{component.label} must be a list of some of {', '.join(values)}; got {shown(value)}."
    elif not isinstance(value, str) or value not in values:
        return f"{component.label} must be one of {', '.join(values)}; got {shown(value)}."
    return None


def payload_problem(component: gr.components.Component, value: object) -> str | None:
    """Why ``value`` is not a well-formed raw value for ``component`` (before Gradio converts it), or None."""
    if isinstance(component, gr.Image):
        return upload_problem(value)
    if isinstance(component, (gr.Slider, gr.Number)):
        return number_problem(component, value, required=isinstance(component, gr.Slider))
    if isinstance(component, (gr.Dropdown, gr.CheckboxGroup)):
        return choice_problem(component, value)
    if isinstance(component, gr.Textbox) and not (value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)):
        return f"{component.label} must be text of at most {MAX_TEXT} characters; got {shown(value)}."
    return None


def request_problem(block_fn: BlockFunction, inputs: object, state: SessionState | None) -> str | None:
    """The first thing wrong with a request's raw values, in one sentence, or None."""
    components = block_fn.inputs
    if not isinstance(inputs, list) or len(inputs) != len(components):
        count = len(inputs) if isinstance(inputs, list) else 0
        labels = ", ".join(str(getattr(c, "label", None) or type(c).__name__) for c in components)
        return (f"/{block_fn.api_name or block_fn.name} takes {len(components)} values ({labels}); "
                f"got {count}.")
    for component, value in zip(components, inputs):
        if state is not None and component._id in state:  # this session's copy: a dropdown's choices change
            component = state[component._id]
        problem = payload_problem(component, value)
        if problem is not None:
            return problem
    return None


def refuse_malformed_requests(app: gr.Blocks) -> gr.Blocks:
    """Check each request's raw values before Gradio preprocesses them, and refuse with one sentence.

    Gradio's preprocessing answers a wrong type, a missing value or a path outside its uploads with an
    exception it reports to the client as ``{"error": null}`` (only gr.Error texts are sent), and it
    downloads an image given as a URL; this check runs first, on every endpoint, the private ones too.
    """
    gradio_preprocess = app.preprocess_data

    async def preprocess_data(block_fn: BlockFunction, inputs: list, state: SessionState | None,
                              explicit_call: bool = False) -> list:
        try:
            problem = request_problem(block_fn, inputs, state)
        except Exception:  # noqa: BLE001 - a flaw in this check must still answer with a reason
            logging.getLogger("vggkit.app").exception("checking a request to %s failed", block_fn.name)
            problem = "This request could not be read; send the values the API page lists for this endpoint."
        if problem is not None:
            raise gr.Error(problem, print_exception=False)
        return await gradio_preprocess(block_fn, inputs, state, explicit_call)

    app.preprocess_data = preprocess_data  # an instance attribute: process_api calls self.preprocess_data
    return app


def unopened_uploads(image: gr.Image) -> gr.Image:
    """Make ``image`` hand an uploaded file to vggkit unopened.

    gr.Image opens every upload with PIL before the callback runs, so a text file named .jpg, an
    empty file or a decompression bomb ended in Gradio's generic error; this way
    vggkit.data.images.load_image decodes and validates the file, and its message reaches the user.
    (An instance attribute, not a subclass: Gradio writes a .pyi file beside any module that
    defines a component class.)
    """

    def preprocess(payload: ImageData | None) -> str | None:
        if payload is None:
            return None
        return str(payload.path)  # refuse_malformed_requests let only uploads through: a path, never a link

    image.preprocess = preprocess
    return image


def image_input(label: str, elem_id: str) -> gr.Image:
    """An upload box (files reach vggkit.data.images.load_image as paths) with the example photographs under it."""
    # The browser uploads a pasted picture too: both sources send a file in Gradio's upload folder.
    image = unopened_uploads(gr.Image(value=DEFAULT_EXAMPLE, type="filepath", image_mode=None, label=label,
                                      sources=["upload", "clipboard"], height=300, elem_id=elem_id))
    gr.Examples(EXAMPLES, inputs=image, label="Examples")
    return image


def layer_picker(layers: list[str], elem_id: str) -> gr.Dropdown:
    """A dropdown of ``layers``, on the layer the views start from."""
    return gr.Dropdown(layers, value=views.default_layer(layers), label="Layer", elem_id=elem_id)


@user_errors
def clicked(evt: gr.EventData) -> tuple[float, float]:
    """The position clicked on a picture (read from the raw event: gr.SelectData fails on a malformed one)."""
    data = getattr(evt, "_data", None)
    index = data.get("index") if isinstance(data, dict) else None
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise ValueError(f"A click must give the position clicked on the picture, [x, y]; got {shown(index)}.")
    return views.finite_position(index)


def receptive_field_tab(app: gr.Blocks, network: views.DemoModel) -> None:
    """The receptive field tab: a unit's theoretical and effective receptive field, at a clicked position."""
    @heavy_view
    def receptive_field(image, config, layer, x=None, y=None):
        if image is None:
            return None, None, "", None, None
        click = None if x is None or y is None else (x, y)
        view = network.receptive_field_view(image, config, layer, click)
        return view.picture, view.effective, view.summary, *view.marker

    @user_errors
    def receptive_field_config(config, layer):
        layers = views.spatial_layers(config)
        chosen = layer if layer in layers else views.default_layer(layers)
        return gr.Dropdown(choices=layers, value=chosen), views.receptive_field_table(config)

    with gr.Tab("Receptive field", id="receptive-field"):
        gr.Markdown(
            "Pick a configuration and a layer, then **click the picture**: the red box is the unit's "
            "theoretical receptive field, the heatmap its *effective* receptive field (Luo et al. 2016), "
            "|d unit / d input| by back-propagation on the 224 px centre crop.")
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input("Image (upload, or pick an example below)", "rf-image")
                config = gr.Dropdown(list(PAPER_CONFIGS), value=network.config, label="Configuration")
                layer = layer_picker(network.layers, "rf-layer")
                with gr.Row():
                    x = gr.Number(label="x on the picture", precision=1, minimum=0, maximum=views.PICTURE_SIDE)
                    y = gr.Number(label="y on the picture", precision=1, minimum=0, maximum=views.PICTURE_SIDE)
            with gr.Column(scale=3):
                picture = gr.Image(label="Click a position: the unit's theoretical receptive field",
                                   type="pil", format="png", interactive=False, elem_id="rf-picture")
                summary = gr.Markdown(label="Unit summary")
            with gr.Column(scale=3):
                effective = gr.Plot(label="Effective receptive field", format="png", elem_id="rf-effective")
        with gr.Row():
            table = gr.Dataframe(views.receptive_field_table(network.config), label="Every layer",
                                 interactive=False, max_height=420, elem_id="rf-table")
            gr.Plot(views.receptive_field_growth(), label="Growth with depth, A-E", format="png")

    inputs, outputs = [image, config, layer], [picture, effective, summary, x, y]
    gr.on([image.change, layer.input], receptive_field, inputs, outputs, api_name="receptive_field", **HEAVY)
    config.input(receptive_field_config, [config, layer], [layer, table], api_name="receptive_field_config").then(
        receptive_field, inputs, outputs, api_visibility="private", **HEAVY)
    picture.select(clicked, None, [x, y], api_visibility="private").then(
        receptive_field, inputs + [x, y], outputs, api_name="receptive_field_at", **HEAVY)
    app.load(receptive_field, inputs, outputs, api_visibility="private", **HEAVY)  # the first tab fills on page load


def stacks_tab(app: gr.Blocks) -> None:
    """The 3x3 versus 7x7 tab: a stack of 3x3 convolutions against one large convolution, drawn and measured."""

    @user_errors
    def compare_stacks(channels, depth, size):
        return views.stack_comparison(channels, depth, size)

    @heavy_view
    def measure_stacks(channels, depth, size):
        return views.stack_measurement(channels, depth, size)

    with gr.Tab("3x3 versus 7x7", id="stacks"):
        gr.Markdown(
            "Section 2.3: n stacked 3x3 convs see 2n+1 pixels, as one (2n+1)x(2n+1) conv does, with "
            "fewer weights (27C² against 49C² for n = 3) and n non-linearities instead of one.")
        with gr.Row():
            channels = gr.Slider(*views.STACK_CHANNELS, value=64, step=1, label="Channels C (in and out)")
            depth = gr.Slider(*views.STACK_DEPTH, value=3, step=1, label="Stack depth n")
            size = gr.Slider(*views.STACK_SIZE, value=56, step=8, label="Input size (px)")
        costs = gr.Dataframe(label="Per design", interactive=False, elem_id="st-costs")
        drawing = gr.Plot(label="Receptive field, layer by layer", format="png", elem_id="st-drawing")
        measure = gr.Button("Measure both as PyTorch modules on this machine", elem_id="st-measure")
        measured = gr.Dataframe(label="Measured", interactive=False, elem_id="st-measured")

    inputs = [channels, depth, size]
    gr.on([s.release for s in inputs], compare_stacks, inputs, [costs, drawing], api_name="compare_stacks")
    measure.click(measure_stacks, inputs, measured, api_name="measure_stacks", **HEAVY)
    app.load(compare_stacks, inputs, [costs, drawing], api_visibility="private")  # light: filled on page load too


def score_maps_tab(network: views.DemoModel) -> None:
    """The class score maps tab: dense evaluation over several test scales, one class's map over the image."""
    @heavy_view
    def score_maps(image, scales, class_name=None):
        if image is None:
            return None, None, None, None
        view = network.score_maps_view(image, scales or DEFAULT_SCALES, class_name)
        return view.top5, view.overlay, view.sizes, network.class_label(view.class_index)

    with gr.Tab("Class score maps", id="score-maps") as tab:
        gr.Markdown(
            "Section 3.2, dense evaluation: fc6-fc8 become convolutions, the network runs on the whole "
            "image rescaled to shortest side Q and gives a class score map of floor(side/32) - 6 per side; "
            "its spatial mean, softmax, averaged with the mirror image's and over the scales, is the "
            "prediction.")
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input("Image", "sm-image")
                scales = gr.CheckboxGroup(SCALE_CHOICES, value=DEFAULT_SCALES, label="Test scales Q")
                class_name = gr.Textbox(label="Class to map", elem_id="sm-class",
                                        placeholder="an index or a name, e.g. 281 or tabby; blank: the "
                                                    "top prediction (press Enter)")
                sizes = gr.Dataframe(label="Raw class score map sizes", interactive=False, elem_id="sm-sizes")
            with gr.Column(scale=3):
                overlay = gr.Plot(label="Class score map over the image (softmax probability, mean "
                                        "over the scales and the mirror image)", format="png",
                                  elem_id="sm-overlay")
                top5 = gr.Dataframe(label="Top 5 (dense, averaged over flips and scales)",
                                    interactive=False, elem_id="sm-top5")

    outputs = [top5, overlay, sizes, class_name]
    gr.on([image.change, scales.input], score_maps, [image, scales], outputs, api_name="score_maps", **HEAVY)
    class_name.submit(score_maps, [image, scales, class_name], outputs, api_name="score_map_of_class", **HEAVY)
    # Heavy: filled when first opened, not on page load (then from the cache).
    tab.select(score_maps, [image, scales, class_name], outputs, api_visibility="private", **HEAVY)


def feature_maps_tab(network: views.DemoModel) -> None:
    """The feature maps tab: a layer's strongest channels on the centre crop."""
    @heavy_view
    def feature_maps(image, layer, count):
        if image is None:
            return None, None
        view = network.feature_maps_view(image, layer, count)
        return view.grid, view.info

    with gr.Tab("Feature maps", id="feature-maps") as tab:
        gr.Markdown("The activations of a named layer on the 224 px centre crop, channels with the "
                    "largest mean activation first.")
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input("Image", "fm-image")
                layer = layer_picker(network.layers, "fm-layer")
                count = gr.Slider(4, views.CHANNELS_SHOWN[1], value=16, step=4, label="Channels shown")
                info = gr.Dataframe(label="Layer", interactive=False, elem_id="fm-info")
            with gr.Column(scale=3):
                grid = gr.Plot(label="Channels, strongest first", format="png", elem_id="fm-grid")

    inputs, outputs = [image, layer, count], [grid, info]
    gr.on([image.change, layer.input, count.release], feature_maps, inputs, outputs, api_name="feature_maps",
          **HEAVY)
    tab.select(feature_maps, inputs, outputs, api_visibility="private", **HEAVY)  # heavy: filled when first opened


def models_tab(network: views.DemoModel) -> None:
    """The models tab: the paper's Tables 1 and 2, where the parameters are, and the loaded weights."""
    with gr.Tab("Models", id="models"):
        gr.Markdown("Tables 1 and 2 of the paper, generated from vggkit's configurations; parameters are "
                    "counted from built modules.")
        gr.Dataframe(views.table1(), label="Table 1: configurations", interactive=False, wrap=True,
                     column_widths=["10%"] + ["15%"] * len(PAPER_CONFIGS), elem_id="table1")
        gr.Dataframe(views.table2(), label="Table 2: parameters", interactive=False, elem_id="table2")
        with gr.Row():
            gr.Plot(views.parameter_figure(), label="Where the parameters are", format="png",
                    elem_id="parameters")
            gr.Dataframe(network.weights_table(), label="Loaded weights", interactive=False, wrap=True,
                         elem_id="weights")


def build_app(model_name: str = "vgg16", weights: str | None = "imagenet", width: float | None = None) -> gr.Blocks:
    """The Blocks app around one network (``width`` < 1 gives a thin model, for tests)."""
    network = views.load_demo_model(model_name, weights, width)
    with gr.Blocks(title="vggkit: how a VGG network sees") as app:
        gr.Markdown(network.notice or "", visible=network.notice is not None, elem_id="untrained-banner")
        gr.Markdown(INTRO)
        with gr.Tabs():
            receptive_field_tab(app, network)
            stacks_tab(app)
            score_maps_tab(network)
            feature_maps_tab(network)
            models_tab(network)
    return refuse_malformed_requests(app)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 65535, not {text!r}")
    return port


def port_problem(host: str, port: int) -> str | None:
    """Why the app cannot listen on host:port (in use, unknown host), or None when it can."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is in use (another app?); pass a free one with --port, "
                        f"e.g. --port {port + 1 if port < 65535 else 7861}")
            return f"cannot listen on {host}:{port} ({error.strerror or error}); check --host and --port"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py", description="The vggkit app: receptive fields, 3x3 versus 7x7 convolutions, "
        "class score maps and feature maps of a VGG network, served on this machine only.",
        epilog="examples: python app.py | python app.py --weights path/to/vgg16-397923af.pth --port 7861 | "
               "python app.py --model vgg19 --weights none")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; 0.0.0.0 exposes the app to your network)")
    parser.add_argument("--port", type=port_number, default=7860, help="port, 1 to 65535 (default 7860)")
    parser.add_argument("--model", default="vgg16", help="model name: A..E, vgg11, vgg13, vgg16, vgg19, ... "
                        "(default vgg16)")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (torchvision's release), timm, caffe, a weight file, or none for random "
                             "weights (default imagenet; offline and not cached, the app starts with random "
                             "weights and says so)")
    parser.add_argument("--width", type=positive_float, default=None,
                        help="channel multiplier (default: the weights' own, else 1.0); below 1 only with "
                             "--weights none or a matching file")
    return parser.parse_args(argv)


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Queue and serve ``app``: one heavy request at a time (``HEAVY``), each light view one at a time, at most
    ``MAX_QUEUE`` waiting, no share link, uploads capped.

    ``block=False`` returns once the server runs (tests; stop it with ``app.close()``).
    """
    app.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    # The model, torch and Gradio leave half a million objects that are never garbage: frozen, they are
    # left out of every later collection (heavy_view collects before each heavy request).
    gc.collect()
    gc.freeze()
    return app.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE_SIZE,
                      ssr_mode=False, css=CSS, footer_links=["api", "settings"], prevent_thread_lock=not block,
                      quiet=not block, state_session_capacity=MAX_SESSIONS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = port_problem(args.host, args.port)  # before the model loads: say it at once
    if problem is not None:
        return fail(problem)
    try:
        app = build_app(args.model, args.weights, args.width)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return fail(str(error))
    try:
        serve(app, args.host, args.port)
    except OSError:  # taken meanwhile: Gradio's own message names an environment variable, not --port
        return fail(port_problem(args.host, args.port) or f"cannot listen on {args.host}:{args.port}")
    return 0


def fail(message: str) -> int:
    print(f"app.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
