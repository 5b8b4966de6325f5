"""The ``vggkit`` command: ``info | train | evaluate | finetune | extract | predict | bench``.

Wiring only: each subcommand parses its arguments and calls the library.
"""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import layer_table, runtime_report

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


def _train(args: argparse.Namespace) -> int:
    from .recipe import list_recipes
    from .train import cleanup_distributed, train

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
                       stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
    finally:
        cleanup_distributed()
    state = "finished" if result.completed else "stopped; continue with --resume"
    print(f"vggkit train: {state}. Checkpoint {result.checkpoint}" + (f", best {result.best}" if result.best else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, load_model

    model = load_model(args.model, args.weights)
    result = evaluate(model, args.data, protocol=args.protocol, scales=args.scales, flip=not args.no_flip,
                      batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                      device=args.device, predictions_csv=args.csv, progress=not args.no_progress)
    print(result.table())
    if result.predictions_csv:
        print(f"\nPer-image predictions: {result.predictions_csv}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vggkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="layer table of a model: shapes, parameters, receptive fields, FLOPs",
                          description="Print a model's layers with output shapes, parameters, receptive "
                                      "field/stride/padding and multiply-adds.")
    info.add_argument("model", nargs="?", help="model name, e.g. vgg16, D, vgg19_bn (default vgg16)")
    info.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    info.add_argument("--width", type=float, default=1.0, help="channel multiplier (default 1.0)")
    info.add_argument("--runtime", action="store_true", help="print the device/precision vggkit will use")
    info.set_defaults(handler=_info)

    train = sub.add_parser(
        "train", help="the paper's ImageNet training (Table 3 recipes), on one GPU, many GPUs or many machines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a VGG from a recipe on an ImageFolder tree (DATA/train/<wnid>/*.JPEG, "
                    "DATA/val/<wnid>/*.JPEG).",
        epilog="Recipes are TOML files (recipes/imagenet/*.toml, one per row of the paper's Table 3; "
               "--list-recipes names them). Any recipe value can be overridden:\n"
               "  --set optim.lr=0.001 --set data.scale=[256,512] --set model.name=D\n"
               "The explicit flags below are shortcuts for the same keys.\n\n"
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
    train.add_argument("--epochs", type=int, help="schedule.epochs")
    train.add_argument("--lr", type=float, help="optim.lr")
    train.add_argument("--batch-size", type=int, help="optim.batch_size: the global batch")
    train.add_argument("--max-batch-per-gpu", type=int,
                       help="run.max_batch_per_gpu: micro-batch limit; gradients are accumulated above it")
    train.add_argument("--workers", type=int, help="data.workers: DataLoader processes per GPU")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="run.precision")
    train.add_argument("--device", help="run.device, e.g. cpu (default: cuda:LOCAL_RANK where there is a GPU)")
    train.add_argument("--compile", action="store_true", help="run.compile: torch.compile the model")
    train.add_argument("--gpu-decode", action="store_true", help="data.gpu_decode: decode JPEGs on the GPU")
    train.add_argument("--checkpoint-every", type=int, help="run.checkpoint_every: also checkpoint every N steps")
    train.add_argument("--max-steps", type=int, help="schedule.max_steps: end the run after N optimizer steps")
    train.add_argument("--seed", type=int, help="run.seed")
    train.add_argument("--stop-after-steps", type=int, default=0, metavar="N",
                       help="stop this invocation after N steps with a checkpoint, to --resume later "
                            "(time-limited jobs)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--list-recipes", action="store_true", help="print the shipped recipe names and exit")
    train.set_defaults(handler=_train)

    from .evaluate import PROTOCOLS

    evaluate = sub.add_parser(
        "evaluate", help="top-1/top-5 errors with the paper's test protocols (section 3.2, Tables 3-5)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model on a class-folder dataset (VAL_DIR/<class>/<images>; ImageNet val in wnid "
                    "folders) with the paper's test protocols, all in one pass over the data:\n"
                    "  center           shortest side to 256, centre 224 crop (how torchvision reports)\n"
                    "  dense            fully-convolutional net on the whole image rescaled to each Q,\n"
                    "                   class score map averaged; softmax over the image and its flip\n"
                    "  multicrop        5x5 grid of 224 crops x 2 flips = 50 crops per Q\n"
                    "  dense+multicrop  the average of both (Table 5)\n"
                    "Softmax is averaged over the scales Q. Prints a table shaped like Table 5.",
        epilog="example: vggkit evaluate --model vgg16 --weights imagenet --data /data/imagenet/val "
               "--protocol dense multicrop dense+multicrop --scales 256 384 512")
    evaluate.add_argument("--model", required=True,
                          help="model name (vgg16, D, vgg19_bn, ...) or a vggkit checkpoint file")
    evaluate.add_argument("--weights", help="imagenet, caffe, timm or a weights file (with a model name)")
    evaluate.add_argument("--data", required=True, metavar="VAL_DIR", help="class-folder dataset to evaluate on")
    evaluate.add_argument("--protocol", nargs="+", default=["dense"], metavar="P",
                          choices=PROTOCOLS,
                          help="one or more of center, dense, multicrop, dense+multicrop (default dense)")
    evaluate.add_argument("--scales", nargs="+", type=int, default=[256, 384, 512], metavar="Q",
                          help="test scales Q, shortest side in pixels, >= 224 (default 256 384 512)")
    evaluate.add_argument("--no-flip", action="store_true", help="leave out the horizontally flipped images")
    evaluate.add_argument("--batch-size", type=int, default=50, help="crops per forward pass (default 50)")
    evaluate.add_argument("--workers", type=int, help="image decoding processes (default: CPU count, at most 8)")
    evaluate.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="auto: bf16 where the hardware runs it fast, else fp32")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when present)")
    evaluate.add_argument("--csv", metavar="PRED.csv", help="write every image's top-5 per protocol to this CSV")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_evaluate)

    # Further subcommands register here (train, evaluate, finetune, extract, predict, bench).
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"vggkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
