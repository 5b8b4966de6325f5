"""The ``vggkit`` command: ``info | train | evaluate | finetune | extract | predict | bench | export | app``.

Wiring only: each subcommand parses its arguments and calls the library. The library
(and PyTorch) is imported inside the handlers, so ``--help`` and ``--version`` answer at once.
Ranges come from ``vggkit.utils.checks``, shared with the Python API; its errors are shown here
in the command line's spelling (``--width inf``, not ``width=inf``).
"""

from __future__ import annotations

import _thread
import argparse
import gc
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .utils.checks import (
    ArgumentError,
    argparse_type,
    check_fraction,
    check_int,
    check_positive,
    check_side,
    check_width,
)
from .utils.choices import DECODERS, PRECISIONS, PROTOCOLS
from .utils.lock import OutputBusyError

DESCRIPTION = ("vggkit: the VGG networks of Simonyan & Zisserman. Run 'vggkit COMMAND --help' for a command's "
               "options and an example.")


# Range-checked argument types: the same checks the API runs, refused while parsing (exit 2, before any work).
positive_int = argparse_type(lambda v: check_int("value", v, 1), int)
non_negative_int = argparse_type(lambda v: check_int("value", v, 0), int)
positive_number = argparse_type(lambda v: check_positive("value", v))
width_type = argparse_type(lambda v: check_width("width", v))
side_type = argparse_type(lambda v: check_side("size", v), int)
fraction_type = argparse_type(lambda v: check_fraction("val_fraction", v))
positive_float = width_type  # the app's --width


# API argument names that the command line spells differently.
FLAGS = {"num_workers": "--workers", "workers": "--workers", "output_dir": "--output", "model_or_name": "--model",
         "top_k": "--top-k", "data_dir": "DATA_DIR"}


API_ARGUMENTS = ("weights", "width", "num_classes", "model", "image_size", "scales", "val_fraction", "patience",
                 "epochs", "lr", "batch_size", "num_workers", "workers", "device", "output_dir", "layer",
                 "strategy", "optimizer", "backbone_lr_scale", "unfreeze_blocks", "stop_after_steps", "top_k",
                 "precision", "protocol", "head", "layout")


_API_VALUE = re.compile(r"(?<![\w.\-])(" + "|".join(API_ARGUMENTS) + r")=('[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;:)]+)")


def flag_of(argument: str) -> str:
    """The command-line spelling of an API argument: ``num_classes`` -> ``--num-classes``."""
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def cli_voice(message: str) -> str:
    """An API message in the command line's words: ``pass weights='x.pth'`` -> ``pass --weights x.pth``."""
    def flag(match: re.Match) -> str:
        value = match.group(2).strip("'\"")
        return f"{flag_of(match.group(1))} {'none' if value == 'None' else value}"

    spoken = _API_VALUE.sub(flag, message)
    return re.sub(r"(--[\w-]+ [^\s()]+) \(\1\)", r"\1", spoken)  # "--model D (--model D)" once


def _error_text(error: Exception) -> str:
    if isinstance(error, ArgumentError) and "." not in error.argument:  # recipe keys keep their --set spelling
        return f"{flag_of(error.argument)} {error.value}: {error.requirement}."
    if isinstance(error, OutputBusyError):  # the holder's command line is quoted as it was typed
        return str(error)
    return cli_voice(str(error))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same unwinding (temp files removed,
    the output's lock released, DataLoader workers ended) and the same one line, exit 143 instead of 130."""


class _Interrupts:
    """What main() installs while a command runs and puts back after it: SIGINT and SIGTERM raise
    KeyboardInterrupt and Terminated, and what an interrupt sets off is not an error of its own."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved: dict = {}
        self.pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread only
        # SIGINT is taken over only from Python's default: an ignored one (a shell's background job) stays so.
        numbers = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self.saved = {number: signal.signal(number, self.on_signal) for number in numbers}
        self.saved["unraisable"], sys.unraisablehook = sys.unraisablehook, self.on_unraisable
        self.saved["thread"], threading.excepthook = threading.excepthook, self.on_thread_error
        self.saved["sys"], sys.excepthook = sys.excepthook, self.on_error  # multiprocessing's threads call it

    def silence(self) -> None:
        """The command has ended: a second Ctrl-C now would only cut its last line short."""
        for number in (signal.SIGINT, signal.SIGTERM):
            if number in self.saved:
                signal.signal(number, signal.SIG_IGN)

    def restore(self) -> None:
        if self.received is not None:
            gc.collect()  # what the interrupt left in reference cycles (DataLoader iterators) ends while hooked
        for key, value in self.saved.items():
            if key == "unraisable":
                sys.unraisablehook = value
            elif key == "thread":
                threading.excepthook = value
            elif key == "sys":
                sys.excepthook = value
            else:
                signal.signal(key, signal.SIG_DFL if value is None else value)
        self.saved = {}

    def on_signal(self, signum: int, frame) -> None:
        """Stop the command. DataLoader workers the same signal ended (a Ctrl-C or a scheduler's SIGTERM
        reaches the whole process group) are no error: torch's SIGCHLD handler, which would raise one from
        wherever the unwinding is (a worker's join in ``__del__``: a traceback), does nothing until restore."""
        if os.getpid() != self.pid:
            # A DataLoader worker forked a moment ago, before torch set its own handlers: the group's signal
            # reached the parent too, which stops the command and ends its workers. Raising here would print
            # multiprocessing's traceback from the child's start.
            return
        self.received = signum
        if callable(signal.getsignal(signal.SIGCHLD)) and signal.SIGCHLD not in self.saved:
            self.saved[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda number, frame: None)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def on_unraisable(self, unraisable) -> None:
        """An interrupt raised where Python cannot pass it on is raised again a moment later in the main
        thread's own code, not printed ("Exception ignored in ...") and lost: a Ctrl-C that arrives while a
        DataLoader forks its workers is handled in logging's after-fork hook, which swallows it. Other errors
        there after an interrupt are its echo and not shown (the ``__del__`` of a DataLoader iterator the
        interrupt cut short in its ``__init__``: AttributeError)."""
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return None if self.received is not None else self.saved["unraisable"](unraisable)
        number = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT

        def again() -> None:
            if signal.getsignal(number) == self.on_signal:  # the command still runs
                if hasattr(signal, "pthread_kill"):  # a real signal to the main thread: it ends a blocking wait
                    signal.pthread_kill(threading.main_thread().ident, number)
                else:
                    _thread.interrupt_main(number)

        threading.Timer(0.05, again).start()  # by then the hook (microseconds) has returned

    def echo(self, error: BaseException, tb) -> bool:
        """Whether ``error`` was set off by an interrupt, and so is not shown: any after a signal, and in a
        DataLoader worker (forked with these hooks) its resource sharer's lost connection, when the
        interrupted main process dropped a batch half-received (BrokenPipeError, ConnectionResetError)."""
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        sharer = os.path.join("multiprocessing", "resource_sharer.py")
        return self.received is not None or (isinstance(error, (ConnectionError, EOFError))
                                             and any(frame.endswith(sharer) for frame in frames))

    def on_thread_error(self, args) -> None:
        if not self.echo(args.exc_value, args.exc_traceback):
            self.saved["thread"](args)

    def on_error(self, kind, error, tb) -> None:
        if not self.echo(error, tb):
            self.saved["sys"](kind, error, tb)


def _interrupted(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> int:
    """One line for an interrupted command: what the library said it left (train, finetune), else what is true
    of the command's files, on a line of its own: open progress bars are closed first, and where bars were
    drawn the line starts with a carriage return (one cut mid-close leaves its text on the line)."""
    tqdm_std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm_std, "tqdm", None), "_instances", ())):
        bar.close()
    drawn = tqdm_std is not None and not getattr(args, "no_progress", False)
    start = ("\r\033[K" if sys.stderr.isatty() else "\r") if drawn else ""
    if interrupt.args:
        line = str(interrupt)
    elif args.command == "evaluate" and args.csv and Path(args.csv + ".partial").is_file():
        # evaluate's PredictionsCsv writes the rows there and renames the file when the pass completes.
        line = f"interrupted; the predictions so far are kept in {args.csv}.partial"
    elif args.command == "extract":
        line = f"interrupted; partial features not kept ({args.output} not written)"
    else:
        line = "interrupted; nothing written"
    print(f"{start}vggkit {args.command}: {line}", file=sys.stderr)
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


# Options several commands share, spelled once so that their help and choices cannot drift apart.
_AUTO_PRECISION = "bf16 where the hardware runs it fast, else fp32"


def _add_device(parser: argparse.ArgumentParser) -> None:
    """``--device`` as evaluate, finetune, extract and predict take it."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when present)")


def _add_precision_and_device(parser: argparse.ArgumentParser,
                              precision_help: str = f"auto (default): {_AUTO_PRECISION}") -> None:
    """``--precision`` (default auto) followed by ``--device``: the inference commands' pair."""
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)
    _add_device(parser)


def _add_decode(parser: argparse.ArgumentParser) -> None:
    """``--decode``: where evaluate and extract decode their images."""
    parser.add_argument("--decode", default="auto", choices=DECODERS,
                        help="device: JPEGs decoded (nvJPEG) and rescaled on the GPU, PIL for other files; "
                             "auto: device on a GPU, else pil")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    """``--workers`` defaulting to 0 (decoding in the main process), as finetune and extract take it."""
    parser.add_argument("--workers", type=non_negative_int, default=0, help="image decoding processes (default 0)")


def _add_no_progress(parser: argparse.ArgumentParser, help_text: str = "no progress bar") -> None:
    """``--no-progress``, as train, evaluate, finetune and extract take it."""
    parser.add_argument("--no-progress", action="store_true", help=help_text)


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit info``."""
    info = subparsers.add_parser("info", help="layer table of a model: shapes, parameters, receptive fields, FLOPs",
                                 description="Print a model's layers with output shapes, parameters, receptive "
                                             "field/stride/padding and multiply-adds.",
                                 epilog="examples: vggkit info vgg16 | vggkit info vgg19_bn --input-size 384 "
                                        "(the dense form) | vggkit info --runtime")
    info.add_argument("model", nargs="?", help="model name, e.g. vgg16, D, vgg19_bn (default vgg16)")
    info.add_argument("--input-size", type=side_type, default=224,
                      help="square input side in pixels, 32 to 2048 (default 224)")
    info.add_argument("--width", type=width_type, default=1.0, help="channel multiplier (default 1.0)")
    info.add_argument("--runtime", action="store_true", help="print the device/precision vggkit will use")
    info.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> int:
    from .app.info import layer_table, runtime_report

    if args.runtime:
        print(runtime_report())
    if args.model or not args.runtime:
        print(layer_table(args.model or "vgg16", input_size=args.input_size, width=args.width))
    return 0


TRAIN_FLAGS = {  # explicit flags of `vggkit train` and the recipe keys they set
    "epochs": "schedule.epochs", "lr": "optim.lr", "batch_size": "optim.batch_size", "workers": "data.workers",
    "max_batch_per_gpu": "run.max_batch_per_gpu", "precision": "run.precision", "device": "run.device",
    "checkpoint_every": "run.checkpoint_every", "max_steps": "schedule.max_steps", "seed": "run.seed",
}


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit train``: no defaults of its own, so that a flag left out keeps the recipe's (or --resume's) value."""
    train = subparsers.add_parser(
        "train", help="the paper's ImageNet training (Table 3 recipes), on one GPU, many GPUs or many machines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a VGG from a recipe on an ImageFolder tree (DATA/train/<wnid>/*.JPEG, "
                    "DATA/val/<wnid>/*.JPEG).",
        epilog="examples:\n"
               "  vggkit train --recipe A --data /data/imagenet --output runs/imagenet/A\n"
               "  vggkit train --resume --data /data/imagenet --output runs/imagenet/A\n\n"
               "Recipes are TOML files (recipes/imagenet/*.toml, one per row of the paper's Table 3; "
               "--list-recipes names them). Any recipe value can be overridden:\n"
               "  --set optim.lr=0.001 --set data.scale=[256,512] --set model.name=D\n"
               "The explicit flags above are shortcuts for the same keys.\n\n"
               "Many GPUs (DDP, global batch split over processes):\n"
               "  torchrun --nproc_per_node=8 -m vggkit.cli train --recipe A --data IMAGENET --output runs/A\n"
               "Many machines: the same on each node with --nnodes=N --node_rank=i "
               "--rdzv_backend=c10d --rdzv_endpoint=HOST:29400.\n"
               "A run folder holds last.pt (resumable: --resume continues mid-epoch), best.pt, "
               "metrics.jsonl, curves.png, recipe.toml.")
    train.add_argument("--recipe", help="recipe TOML file, or a name from recipes/imagenet/ (e.g. D-256-512); "
                                        "optional with --resume")
    train.add_argument("--data", help="ImageNet folder with train/ and val/, one sub-folder per class")
    train.add_argument("--output", help="run folder: checkpoints, logs, curves")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value (repeatable), e.g. --set optim.lr=0.001")
    train.add_argument("--epochs", type=positive_int, help="schedule.epochs")
    train.add_argument("--lr", type=positive_number, help="optim.lr")
    train.add_argument("--batch-size", type=positive_int, help="optim.batch_size: the global batch")
    train.add_argument("--max-batch-per-gpu", type=non_negative_int,
                       help="run.max_batch_per_gpu: micro-batch limit; gradients are accumulated above it")
    train.add_argument("--workers", type=non_negative_int, help="data.workers: DataLoader processes per GPU")
    train.add_argument("--precision", choices=PRECISIONS, help="run.precision")
    train.add_argument("--device", help="run.device, e.g. cpu (default: cuda:LOCAL_RANK where there is a GPU)")
    train.add_argument("--compile", action="store_true",
                       help="run.compile=true: compile the training step (default 'auto': on CUDA, long runs)")
    train.add_argument("--gpu-decode", action="store_true", help="data.gpu_decode: decode JPEGs on the GPU")
    train.add_argument("--checkpoint-every", type=non_negative_int,
                       help="run.checkpoint_every: also checkpoint every N steps")
    train.add_argument("--max-steps", type=non_negative_int,
                       help="schedule.max_steps: end the run after N optimizer steps")
    train.add_argument("--seed", type=int, help="run.seed")
    train.add_argument("--stop-after-steps", type=positive_int, metavar="N",
                       help="stop this invocation after N steps with a checkpoint, to --resume later "
                            "(time-limited jobs)")
    _add_no_progress(train)
    train.add_argument("--list-recipes", action="store_true", help="print the shipped recipe names and exit")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from .training.loop import cleanup_distributed, train
    from .training.recipe import list_recipes

    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    if not args.data or not args.output:
        raise ValueError("--data and --output are required (see vggkit train --help).")
    overrides = [f"{key}={getattr(args, flag)!r}" if isinstance(getattr(args, flag), str)
                 else f"{key}={getattr(args, flag)}" for flag, key in TRAIN_FLAGS.items()
                 if getattr(args, flag) is not None]
    overrides += [f"{key}=true" for flag, key in (("compile", "run.compile"), ("gpu_decode", "data.gpu_decode"))
                  if getattr(args, flag)]
    try:
        result = train(args.recipe, args.data, args.output, resume=args.resume, overrides=overrides + args.set,
                       stop_after_steps=args.stop_after_steps or 0, progress=not args.no_progress)
    finally:
        cleanup_distributed()
    if result.save_error:  # a full disk stopped the run; its warning said where the checkpoint went
        return 2
    state = "finished" if result.completed else "stopped; continue with --resume"
    print(f"vggkit train: {state}. Checkpoint {result.checkpoint}" + (f", best {result.best}" if result.best else ""))
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit evaluate``."""
    evaluate = subparsers.add_parser(
        "evaluate", help="top-1/top-5 errors with the paper's test protocols (section 3.2, Tables 3-5)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model on a class-folder dataset (VAL_DIR/<class>/<images>; ImageNet val in wnid "
                    "folders), WebDataset shards or a Hugging Face dataset with the paper's test protocols, all in "
                    "one pass over the data:\n"
                    "  center           shortest side to 256, centre 224 crop (how torchvision reports)\n"
                    "  dense            fully-convolutional net on the whole image rescaled to each Q,\n"
                    "                   class score map averaged; softmax over the image and its flip\n"
                    "  multicrop        5x5 grid of 224 crops x 2 flips = 50 crops per Q\n"
                    "  dense+multicrop  the average of both (Table 5)\n"
                    "Softmax is averaged over the scales Q. Prints a table shaped like Table 5.",
        epilog="examples:\n"
               "  vggkit evaluate --model vgg16 --weights imagenet --data /data/imagenet/val "
               "--protocol dense multicrop dense+multicrop --scales 256 384 512\n"
               "  vggkit evaluate --model vgg16 --data '/data/shards/val-{000000..000049}.tar' --protocol center\n"
               "  torchrun --nproc_per_node=8 -m vggkit.cli evaluate --model vgg16 --data /data/imagenet/val")
    evaluate.add_argument("--model", required=True,
                          help="model name (vgg16, D, vgg19_bn, ...) or a vggkit checkpoint file")
    evaluate.add_argument("--weights", help="for a model name: imagenet (default), caffe, timm, a weight file, or "
                                            "none (random init); a checkpoint brings its own")
    evaluate.add_argument("--data", required=True, metavar="VAL_DIR",
                          help="class-folder tree, WebDataset shards (a folder of .tar, or a brace pattern such as "
                               "'val-{000000..000049}.tar'), or a Hugging Face dataset (save_to_disk folder or "
                               ".parquet files)")
    evaluate.add_argument("--classes", metavar="CLASSES.txt",
                          help="shards' class names, one a line in label order (default: classes.txt beside them)")
    evaluate.add_argument("--protocol", nargs="+", default=["dense"], metavar="P", choices=PROTOCOLS,
                          help="one or more of center, dense, multicrop, dense+multicrop (default dense)")
    evaluate.add_argument("--scales", nargs="+", type=side_type, default=[256, 384, 512], metavar="Q",
                          help="test scales Q, shortest side in pixels, >= 224 (default 256 384 512)")
    evaluate.add_argument("--no-flip", action="store_true", help="leave out the horizontally flipped images")
    evaluate.add_argument("--batch-size", type=positive_int,
                          help="crops per forward pass and images per window (default 256 on a GPU, 50 on the CPU)")
    _add_decode(evaluate)
    evaluate.add_argument("--workers", type=non_negative_int,
                          help="image decoding processes (default: CPU count, at most 8)")
    _add_precision_and_device(evaluate, precision_help=f"auto: {_AUTO_PRECISION}")
    evaluate.add_argument("--csv", metavar="PRED.csv", help="write every image's top-5 per protocol to this CSV")
    _add_no_progress(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import evaluate, load_model
    from .utils.distributed import is_main, join_from_env

    join_from_env()  # under torchrun: the images are split across the processes
    model = load_model(args.model, _weights_for(args.weights, args.model))
    result = evaluate(model, args.data, protocol=args.protocol, scales=args.scales, flip=not args.no_flip,
                      batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                      device=args.device, predictions_csv=args.csv, progress=not args.no_progress,
                      decode=args.decode, classes=args.classes)
    if not is_main():
        return 0
    print(result.table())
    if result.predictions_csv:
        print(f"\nPer-image predictions: {result.predictions_csv}")
    return 0


def _weights_for(weights: str | None, model: str | None = None):
    """``--weights`` as the API takes it. Left out: imagenet for a model name, a checkpoint's own weights
    for a checkpoint file (the same for evaluate, extract and finetune); ``none``: random initialisation."""
    from .utils.paths import looks_like_a_path

    is_file = model is not None and (Path(model).exists() or looks_like_a_path(model))
    if weights is None:
        return None if is_file else "imagenet"
    if is_file:
        raise ValueError(f"{model} is a checkpoint file and brings its own weights; leave out --weights "
                         f"(it applies to a model name such as vgg16).")
    return None if weights.lower() == "none" else weights


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit finetune``."""
    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a VGG on a folder of your images (transfer learning)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a VGG on DATA_DIR: one folder per class, or train/ and val/ (and test/) each with "
                    "one folder per class. Without val/ the images are split per class (--val-fraction, --seed).\n"
                    "Heads: vgg (keep fc6/fc7, new fc8), linear, mlp. Strategies: head (frozen backbone, its "
                    "features cached), partial (also the last --unfreeze-blocks conv blocks), full.\n"
                    "Writes model.pth, training_curves.png and confusion_matrix.png to --output.",
        epilog="examples:\n"
               "  vggkit finetune photos/ --num-classes 2\n"
               "  vggkit finetune photos/ --strategy partial --unfreeze-blocks 2 --epochs 30\n"
               "  vggkit finetune shapes/ --weights none --model vgg11_bn --width 0.0625 --image-size 64 "
               "--strategy full --optimizer adamw")
    finetune.add_argument("data_dir", metavar="DATA_DIR", help="class folders, or train/ val/ [test/] of them")
    finetune.add_argument("--num-classes", type=positive_int, help="must match the class folders (default: as found)")
    finetune.add_argument("--model", default="vgg16", help="model name (default vgg16)")
    finetune.add_argument("--weights", help="imagenet (default), caffe, timm, a weight file, or none (random init: "
                                            "then --strategy full --optimizer adamw --backbone-lr-scale 1 unless given)")
    finetune.add_argument("--head", default="vgg", choices=("vgg", "linear", "mlp"), help="classifier head")
    finetune.add_argument("--strategy", choices=("head", "partial", "full"),
                          help="what trains: the head only (default with pretrained weights), the last conv blocks "
                               "too, or everything (default with --weights none)")
    finetune.add_argument("--unfreeze-blocks", type=positive_int, default=2,
                          help="conv blocks trained by --strategy partial")
    finetune.add_argument("--epochs", type=positive_int, default=20, help="at most this many epochs (default 20)")
    finetune.add_argument("--patience", type=positive_int, default=5,
                          help="stop after this many epochs without better validation accuracy (default 5)")
    finetune.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default 32)")
    finetune.add_argument("--optimizer", choices=("sgd", "adamw"),
                          help="sgd with momentum 0.9 (default with pretrained weights) or adamw (default with "
                               "--weights none)")
    finetune.add_argument("--lr", type=positive_number,
                          help="head learning rate (default 0.01 for sgd, 0.001 for adamw)")
    finetune.add_argument("--backbone-lr-scale", type=positive_number,
                          help="conv layers train at lr times this (default 0.1; 1 with --weights none)")
    finetune.add_argument("--width", type=width_type, help="channel multiplier, for models trained from scratch "
                                                           "(1/64 to 4; default 1)")
    finetune.add_argument("--image-size", type=side_type,
                          help="square training crop in pixels, 32 to 2048 (default: the weights', 224)")
    finetune.add_argument("--val-fraction", type=fraction_type, default=0.2,
                          help="validation share per class without val/, between 0 and 1 (default 0.2)")
    finetune.add_argument("--cache", default="auto", choices=("auto", "memory", "disk"),
                          help="where frozen-backbone features are kept (auto: memory up to 2 GiB, else disk)")
    finetune.add_argument("--no-cache", action="store_true", help="recompute the frozen backbone every epoch")
    finetune.add_argument("--output", help="output folder (default vggkit_runs/<data>-<model>)")
    finetune.add_argument("--seed", type=int, default=0,
                          help="seed of the split, the initialisation and the batch order (default 0)")
    _add_workers(finetune)
    _add_device(finetune)
    _add_no_progress(finetune, help_text="no progress bars (the epoch lines stay)")
    finetune.set_defaults(handler=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from .finetuning.finetune import finetune

    result = finetune(args.data_dir, args.num_classes, model=args.model, weights=_weights_for(args.weights),
                      head=args.head, strategy=args.strategy, unfreeze_blocks=args.unfreeze_blocks,
                      epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      backbone_lr_scale=args.backbone_lr_scale, width=args.width, image_size=args.image_size,
                      val_fraction=args.val_fraction, patience=args.patience,
                      cache_features=False if args.no_cache else args.cache, output_dir=args.output,
                      seed=args.seed, num_workers=args.workers, device=args.device, progress=not args.no_progress,
                      log_epochs=True)
    metrics = result.metrics
    from .utils.paths import display_name

    recalls = ", ".join(f"{display_name(name)} {value:.3f}" for name, value in metrics["recall"].items())
    print(f"{metrics['split']} accuracy {metrics['accuracy']:.4f} (best epoch {result.best_epoch}); "
          f"recall per class: {recalls}")
    if result.save_error:  # no room for model.pth; its warning said where the weights went instead
        return 2
    print(f"checkpoint: {result.checkpoint}")
    print("plots: " + ", ".join(str(p) for p in result.plots.values()))
    return 0


def _add_extract(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit extract``."""
    extract = subparsers.add_parser(
        "extract", help="features of any layer for a folder of images, written to .npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Extract features at a named layer (conv1_1 ... pool5, fc6, fc7) and write an .npz holding "
                    "features, labels, paths and class_names. With the defaults (fc7, --flip, scales) this is the "
                    "paper's transfer descriptor: dense fc7 averaged over positions and the mirror, L2-normalised, "
                    "averaged (--reduce mean) or stacked (--reduce stack) over scales.",
        epilog="examples:\n"
               "  vggkit extract photos/ --scales 256 384 512 --flip -o features.npz\n"
               "  vggkit extract photos/ --model runs/model.pth --layer pool5 -o pool5.npz\n"
               "  vggkit extract '/data/shards/val-{000000..000049}.tar' --layer pool5 -o val.npz\n"
               "  torchrun --nproc_per_node=4 -m vggkit.cli extract /data/hf_val --layer fc7 -o val.npz")
    extract.add_argument("images", nargs="+", metavar="IMAGES",
                         help="a folder of class folders (labels from them), WebDataset shards (.tar files, a folder "
                              "of them or a brace pattern), a Hugging Face dataset (save_to_disk folder or .parquet), "
                              "a folder of images, or image files")
    extract.add_argument("--classes", metavar="CLASSES.txt",
                         help="shards' class names, one a line in label order (default: classes.txt beside them)")
    extract.add_argument("-o", "--output", default="features.npz", help="output .npz (default features.npz)")
    extract.add_argument("--model", default="vgg16", help="model name or a vggkit checkpoint (default vgg16)")
    extract.add_argument("--weights", help="for a model name: imagenet (default), caffe, timm, a weight file, or none "
                                           "(random init from a fixed seed); a checkpoint brings its own")
    extract.add_argument("--width", type=width_type, help="channel multiplier of a model name (1/64 to 4; "
                                                          "default 1); a checkpoint brings its own")
    extract.add_argument("--layer", default="fc7", help="named layer (default fc7)")
    extract.add_argument("--scales", nargs="+", type=side_type, default=[256], metavar="Q",
                         help="shortest image side(s) in pixels, 32 to 2048; fc6-fc8 need 224 or more (default 256)")
    extract.add_argument("--flip", action="store_true", help="average with the mirror image")
    extract.add_argument("--reduce", default="mean", choices=("mean", "stack", "none"),
                         help="combine scales: average (default), concatenate, or keep (N, S, D)")
    extract.add_argument("--maps", action="store_true", help="keep the spatial maps (one scale) instead of averaging")
    extract.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    _add_precision_and_device(extract)
    _add_workers(extract)
    _add_decode(extract)
    _add_no_progress(extract)
    extract.set_defaults(handler=_extract)


def _extract(args: argparse.Namespace) -> int:
    from .features.extract import extract_to_file, summarise_names
    from .utils.distributed import is_main, join_from_env

    join_from_env()  # under torchrun: the images are split across the processes
    images = args.images[0] if len(args.images) == 1 else args.images
    features = extract_to_file(args.output, args.model, images, layer=args.layer, scales=args.scales,
                               flip=args.flip, reduce=None if args.reduce == "none" else args.reduce,
                               pool=None if args.maps else "avg", weights=_weights_for(args.weights, args.model),
                               width=args.width, batch_size=args.batch_size, precision=args.precision,
                               device=args.device, num_workers=args.workers, progress=not args.no_progress,
                               decode=args.decode, classes=args.classes)
    if not is_main():
        return 0
    path = Path(args.output)
    print(f"{path}: features {tuple(features.features.shape)} from {len(features.paths)} image(s)"
          + (f", classes: {summarise_names(features.class_names)}" if features.class_names else ""))
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit predict``."""
    predict = subparsers.add_parser(
        "predict", help="top-k classes with probabilities for images, from a fine-tuned checkpoint",
        description="Classify images with a vggkit checkpoint (from vggkit finetune or save_checkpoint); the "
                    "checkpoint carries the model, classes and preprocessing.",
        epilog="example: vggkit predict vggkit_runs/photos-vgg16/model.pth cat.jpg dog.png --top-k 2")
    predict.add_argument("checkpoint", metavar="CHECKPOINT", help="a vggkit checkpoint (.pth)")
    predict.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or folders of them")
    predict.add_argument("-k", "--top-k", type=positive_int, default=5, help="how many classes to list (default 5)")
    _add_precision_and_device(predict)
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .evaluation.predict import predict_paths
    from .utils.paths import display_name

    # Folders stand for the image files under them; unusable files are skipped with one warning.
    results = predict_paths(args.checkpoint, args.images, top_k=args.top_k, precision=args.precision,
                            device=args.device)
    for image, top in results.items():
        print(display_name(image))
        for name, probability in top:
            print(f"  {probability:7.4f}  {display_name(name)}")
    return 0


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit bench``."""
    bench = subparsers.add_parser(
        "bench", help="vggkit's default paths against torchvision and timm on this machine",
        description="Time vgg16 on this machine in one process: classification forward, backbone features, dense "
                    "vs multi-crop evaluation, cached vs uncached head fine-tuning and the training data pipeline, "
                    "each against torchvision's or timm's default on the same weights and inputs, with the "
                    "fraction of the matmul peak measured in the same run. Prints a Markdown table; takes about "
                    "2.5 minutes on a quiet 2-core machine, under 10 on a busy one (--quick: under 2).",
        epilog="example: vggkit bench --quick --markdown bench.md")
    bench.add_argument("--quick", action="store_true", help="fewer rounds, smaller batches, no bf16/compile rows")
    bench.add_argument("--device", choices=("cpu", "cuda"),
                       help="cuda: the GPU bench (inference, training step, end-to-end training, input pipelines, "
                            "evaluation at batch 256; under 8 minutes on one GPU); cpu: the CPU bench above "
                            "(default: cuda when a GPU is present)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows and machine facts as JSON")
    bench.add_argument("--markdown", metavar="PATH", help="also write the Markdown table to a file")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.cpu import run_bench, write_outputs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        result = run_bench(quick=args.quick)
    else:
        from .bench.gpu import run_device_bench
        result = run_device_bench(device, quick=args.quick)
    write_outputs(result, args.json, args.markdown)
    print(result.markdown())
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit export``."""
    export = subparsers.add_parser(
        "export", help="write a model as ONNX (.onnx) or a torch.export program (.pt2), checked against PyTorch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the classifier (float32 [batch, 3, 224, 224] -> logits), its dense form (--dense: "
                    "[batch, 3, H, W] -> class score maps) or a backbone (--layers: one output per layer, named "
                    "by it). The batch is always free; --dynamic frees H and W too (--dense, --layers). "
                    "--with-preprocess puts the weights' normalisation into the graph: it then takes one uint8 "
                    "RGB image [H, W, 3] (the 224x224 crop for the classifier). The file is checked in the same "
                    "run (onnxruntime, or the loaded .pt2) against PyTorch on a photograph through the model's "
                    "own preprocessing, and the largest difference is printed; nothing is written if it fails.",
        epilog="examples:\n"
               "  vggkit export vgg16 --weights imagenet -o vgg16.onnx\n"
               "  vggkit export vgg16 --weights imagenet --dense --dynamic --with-preprocess -o vgg16_dense.onnx\n"
               "  vggkit export vgg16 --weights imagenet --layers conv3_3 conv4_3 conv5_3 --dynamic -o fe.pt2\n"
               "  vggkit export vggkit_runs/photos-vgg16/model.pth -o classifier.onnx")
    export.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                        help="model name (vgg16, D, vgg19_bn, ...) or a vggkit checkpoint file")
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx|OUT.pt2",
                        help="the file to write; its suffix picks the format")
    export.add_argument("--weights", help="for a model name: imagenet, caffe, timm, a weight file, or none; "
                                          "left out: random weights (with a warning)")
    export.add_argument("--dense", action="store_true", help="the fully-convolutional form: class score maps")
    export.add_argument("--layers", nargs="+", metavar="L", help="a backbone of these layers, e.g. conv3_3 conv4_3")
    export.add_argument("--dynamic", action="store_true", help="free H and W (with --dense or --layers)")
    export.add_argument("--with-preprocess", action="store_true",
                        help="the graph takes a uint8 RGB image [H, W, 3] and normalises it as the weights expect")
    export.add_argument("--opset", type=positive_int, default=18, help="ONNX opset, 17 or more (default 18)")
    export.add_argument("--image", help="photograph to check the export on (default: the bundled chelsea.jpg)")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from .deploy.export import check_format, export

    # Refused in the command line's words before the model is built.
    check_format(args.output)
    if args.dense and args.layers:
        raise ValueError("Choose --dense (class score maps) or --layers (a backbone), not both.")
    if args.dynamic and not (args.dense or args.layers):
        raise ValueError("--dynamic frees H and W, which the classifier does not take (fc6 reads the 7x7 pool5 of "
                         "its 224 crop); add --dense for score maps at any size, or --layers.")
    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: ONNX export needs opset 17 or more (default 18).")
    weights = None if args.weights is None or args.weights.lower() == "none" else args.weights
    report = export(args.model, args.output, dense=args.dense, layers=args.layers, dynamic=args.dynamic,
                    with_preprocess=args.with_preprocess, opset=args.opset, weights=weights, image=args.image)
    print(report.summary())
    return 0


def _add_pack(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit pack``."""
    pack = subparsers.add_parser(
        "pack", help="convert a class-folder tree into WebDataset shards or parquet files; --verify reads them back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert the class-folder tree SRC (SRC/<class>/<images>, or SRC/train|val|test/<class>/...) "
                    "into WebDataset shards (<split>-000000.tar: <key>.jpg|png + <key>.cls + <key>.json) or "
                    "parquet files (image {bytes, path} and a ClassLabel label), with classes.txt and pack.json "
                    "beside them. OUT is written under a temp name and renamed when complete. Unusable files are "
                    "skipped and reported. --verify OUT checks the counts and decodes every image.",
        epilog="examples:\n"
               "  vggkit pack /data/imagenet/val /data/shards --format wds --shard-size 1GB\n"
               "  vggkit pack photos/ photos_parquet --format parquet\n"
               "  vggkit pack --verify /data/shards")
    pack.add_argument("paths", nargs="+", metavar="PATH", help="SRC OUT: the class-folder tree and the new output "
                                                              "folder (with --verify: OUT alone)")
    pack.add_argument("--format", default="wds", choices=("wds", "parquet"), help="wds (default) or parquet")
    pack.add_argument("--shard-size", default="1GB", metavar="SIZE",
                      help="at most this much image data per shard or parquet file (default 1GB)")
    pack.add_argument("--verify", action="store_true", help="read a pack back: counts and every image decoded")
    _add_no_progress(pack)
    pack.set_defaults(handler=_pack)


def _pack(args: argparse.Namespace) -> int:
    from .data.pack import pack, verify_pack

    if args.verify:
        if len(args.paths) != 1:
            raise ValueError("--verify takes one folder, the pack to check (vggkit pack --verify OUT).")
        problems = verify_pack(args.paths[0])
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        if problems:
            print(f"vggkit pack: {args.paths[0]}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{args.paths[0]}: every image reads; counts as pack.json says")
        return 0
    if len(args.paths) != 2:
        raise ValueError("pack takes SRC and OUT (vggkit pack SRC OUT --format wds), or --verify OUT.")
    result = pack(args.paths[0], args.paths[1], format=args.format, shard_size=args.shard_size,
                  progress=not args.no_progress)
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    print(f"{result.out}: {len(result.files)} {args.format} file(s); images: {counts}"
          + (f"; {len(result.skipped)} file(s) skipped" if result.skipped else ""))
    return 0


def _add_app(subparsers: argparse._SubParsersAction) -> None:
    """``vggkit app``: no help of its own, so that ``vggkit app --help`` reaches the app's."""
    app = subparsers.add_parser("app", help="the Gradio app: how a VGG network sees (python app.py in a clone)",
                                description="Start the vggkit app on 127.0.0.1 (python -m vggkit.app.launch does "
                                            "the same). Every option after 'app' goes to the app; "
                                            "'vggkit app --help' lists them.",
                                add_help=False)
    app.add_argument("app_args", nargs=argparse.REMAINDER, help="the app's options: --port, --host, --model, "
                                                                "--weights, --width")
    app.set_defaults(handler=_app)


def _app(args: argparse.Namespace) -> int:
    from .app.launch import run_app

    app_args = args.app_args[1:] if args.app_args[:1] == ["--"] else args.app_args  # main() put the "--" there
    return run_app(app_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``vggkit`` parser: the top-level options, then one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="vggkit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"vggkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_info, _add_train, _add_evaluate, _add_finetune, _add_extract, _add_predict, _add_bench,
                        _add_export, _add_pack, _add_app):
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # every option after 'app' is the app's own, --help included
        argv = ["app", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    show_warning = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        # A warning reads like the errors: the command's name and the message, not vggkit's source line.
        print(f"vggkit {args.command}: warning: {cli_voice(str(message))}", file=sys.stderr if file is None else file)

    warnings.showwarning = one_line
    interrupts = _Interrupts()
    interrupts.install()
    try:
        return args.handler(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM as Terminated (_Interrupts.on_signal)
        interrupts.silence()
        return _interrupted(args, interrupt)
    except (ValueError, OSError, RuntimeError) as error:  # OSError: FileNotFoundError, PermissionError, ...
        print(f"vggkit {args.command}: error: {_error_text(error)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show_warning
        interrupts.restore()


if __name__ == "__main__":
    sys.exit(main())
