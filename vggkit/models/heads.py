"""Fine-tuning heads and freezing strategies for a VGG.

Heads (all read pool5):

- ``"vgg"``: the paper's classifier, 4096-4096-num_classes with dropout; fc6/fc7 keep
  the loaded weights and fc8 is a fresh ``num_classes`` layer (the usual VGG16 recipe);
- ``"linear"``: global average pool -> dropout -> fc8;
- ``"mlp"``: global average pool -> hidden layer -> ReLU -> dropout -> fc8.

Strategies: ``"head"`` trains the head on a frozen backbone, ``"partial"`` also trains
the last ``unfreeze_blocks`` conv blocks, ``"full"`` trains everything; in the last
two the backbone runs at a lower learning rate than the head.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .vgg import VGG

HEADS = ("vgg", "linear", "mlp")


STRATEGIES = ("head", "partial", "full")


def attach_head(model: VGG, head: str = "vgg", num_classes: int | None = None, hidden: int = 512,
                dropout: float = 0.5) -> VGG:
    """Give ``model`` a fresh ``num_classes`` head in place and record it in ``model.head_config``.

    ``"vgg"`` keeps fc6/fc7 and replaces fc8 only if its size differs. Returns ``model``.
    """
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}; choose from {HEADS}.")
    num_classes = num_classes or model.num_classes
    channels = model.feature_channels
    if head == "vgg":
        if not hasattr(model.classifier, "fc7"):
            # A model that had another head gets the paper's classifier back, freshly initialised.
            fresh = VGG(model.spec, num_classes=num_classes, dropout=dropout, width=model.width)
            model.avgpool, model.classifier = fresh.avgpool, fresh.classifier
        elif model.classifier.fc8.out_features != num_classes:
            model.classifier.fc8 = new_linear(model.classifier.fc7.out_features, num_classes)
        model.classifier.drop6.p = model.classifier.drop7.p = model.dropout = dropout
        model.head_config = {"type": "vgg"}
    else:
        # Global average pooling makes these heads independent of the input size.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if head == "mlp":
            layers["fc_hidden"] = new_linear(channels, hidden)
            layers["relu_hidden"] = nn.ReLU(inplace=True)
        layers["drop"] = nn.Dropout(dropout)
        layers["fc8"] = new_linear(hidden if head == "mlp" else channels, num_classes)
        model.classifier = nn.Sequential(layers)
        model.head_config = {"type": head, "hidden": hidden, "dropout": dropout}
    model.num_classes = num_classes
    return model


def new_linear(in_features: int, out_features: int) -> nn.Linear:
    """A fresh classifier layer initialised as the paper's fc layers: N(0, 0.01), zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


def block_starts(model: VGG) -> list[int]:
    """Index in ``model.features`` where each conv block begins (blocks end at pool1..pool5)."""
    names = [name for name, _ in model.features.named_children()]
    starts = [0] + [i + 1 for i, name in enumerate(names) if name.startswith("pool")]
    return starts[:-1]


def frozen_prefix(model: VGG, strategy: str, unfreeze_blocks: int = 2) -> int:
    """How many leading modules of ``model.features`` stay frozen under ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose from {STRATEGIES}.")
    if strategy == "head":
        return len(model.features)
    if strategy == "full":
        return 0
    starts = block_starts(model)
    if not 1 <= unfreeze_blocks <= len(starts):
        raise ValueError(f"unfreeze_blocks must be 1..{len(starts)} (the conv blocks), got {unfreeze_blocks}.")
    return starts[len(starts) - unfreeze_blocks]


def freeze(model: VGG, frozen: int) -> None:
    """Stop gradients in the first ``frozen`` modules of ``model.features``; train the rest."""
    model.requires_grad_(True)
    for module in list(model.features)[:frozen]:
        module.requires_grad_(False)


def set_train_mode(model: VGG, frozen: int) -> None:
    """Train mode, except the frozen modules stay in eval (their batch-norm statistics are kept)."""
    model.train()
    for module in list(model.features)[:frozen]:
        module.eval()


def parameter_groups(model: VGG, frozen: int, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Optimizer groups: the head at ``lr``, unfrozen conv layers at ``lr * backbone_lr_scale``."""
    head = list(model.classifier.parameters())
    backbone = [p for module in list(model.features)[frozen:] for p in module.parameters()]
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"})
    return groups
