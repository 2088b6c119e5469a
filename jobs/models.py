"""Model builders for the image classification job.

``small_cnn`` and ``small_mlp`` are plain torch, so a run on the bundled digits
never imports torchvision. Any other name is a torchvision model
(``resnet18``, ``resnet50``, ``vit_b_16``, ...), built through
``torchvision.models.get_model``; torchvision is imported only then.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built; the message says what to use instead."""


def small_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """conv-bn-relu twice, average-pool to 4x4, linear; for 8x8 up to ~32x32 inputs.

    Inputs of 16 pixels or more are halved by the second conv. Pooling to 4x4
    rather than 1x1 keeps where the strokes are, which small digits need
    (about 98% on digits after 3 epochs, against well under 90% with 1x1).
    """
    stride = 2 if image_size >= 16 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, num_classes),
    )


def small_mlp(num_classes: int, in_channels: int = 3, image_size: int = 32, hidden: int = 64) -> nn.Module:
    """One hidden layer and no BatchNorm: the same computation whether batches are split or not,
    which is what a test of DDP against single-process training needs."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


BUILTIN_MODELS = {"small_cnn": small_cnn, "small_mlp": small_mlp}


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
                pretrained: bool = False) -> nn.Module:
    """A bare model by name: a built-in one or any ``torchvision.models`` name.

    ``pretrained`` loads torchvision's default weights (downloading them into
    torch's hub cache if they are not there), then replaces the classifier when
    ``num_classes`` differs from the weights' and adapts the first convolution
    when ``in_channels`` is not 3.
    """
    if name in BUILTIN_MODELS:
        if pretrained:
            raise ModelError(f"model {name!r} has no pretrained weights; set job.pretrained=false "
                             "or choose a torchvision model such as resnet18")
        return BUILTIN_MODELS[name](num_classes, in_channels=in_channels, image_size=image_size)
    models = _torchvision_models()
    _check_name(name, models)
    if pretrained:
        weights = _default_weights(name, models)
        try:
            model = models.get_model(name, weights=weights)
        except Exception as err:  # URLError, OSError, ... : whatever stopped the download
            raise ModelError(_download_failed(name, err)) from err
        if num_classes != len(weights.meta["categories"]):
            _replace_head(model, name, num_classes)
    else:
        model = models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_first_conv(model, name, in_channels, keep_weights=pretrained)
    return model


def fetch_pretrained(name: str) -> None:
    """Download a torchvision model's default weights into torch's hub cache (run on rank 0,
    so the other processes then read the file instead of downloading it at the same time)."""
    if name in BUILTIN_MODELS:
        return
    models = _torchvision_models()
    _check_name(name, models)
    weights = _default_weights(name, models)
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise ModelError(_download_failed(name, err)) from err


def _torchvision_models():
    import torchvision.models

    return torchvision.models


def _check_name(name: str, models) -> None:
    if name not in models.list_models():
        examples = ", ".join([*BUILTIN_MODELS, "resnet18", "resnet50", "mobilenet_v3_small",
                              "efficientnet_b0", "convnext_tiny", "vit_b_16"])
        raise ModelError(f"unknown model {name!r}; valid names are {examples}, or any name in "
                         "torchvision.models.list_models()")


def _default_weights(name: str, models):
    try:
        return models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        raise ModelError(f"torchvision has no pretrained weights for {name!r}; set job.pretrained=false") from None


def _download_failed(name: str, err: Exception) -> str:
    return (f"could not load the pretrained weights of {name!r} ({type(err).__name__}: {err}). "
            "Downloading them needs network access; on an offline machine copy the weight file into "
            f"{torch.hub.get_dir()}/checkpoints/ (or set TORCH_HOME), or set job.pretrained=false")


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """Swap the last Linear layer (``fc``, ``classifier[-1]``, ``heads.head``, ...) for a new one."""
    last = None
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = qualified
    if last is None:
        raise ModelError(f"cannot change the number of classes of pretrained {name!r} (its classifier is "
                         "not a Linear layer); choose another model or set job.pretrained=false")
    old = model.get_submodule(last)
    _set_submodule(model, last, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _adapt_first_conv(model: nn.Module, name: str, in_channels: int, keep_weights: bool) -> None:
    """Give the first 3-channel convolution ``in_channels`` inputs (e.g. 1 for grayscale).

    Pretrained filters are summed over RGB and spread evenly over the new
    channels, so a gray image repeated on every channel gives the same response;
    untrained ones keep the fresh layer's default initialisation.
    """
    for qualified, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode)
            if keep_weights:
                with torch.no_grad():
                    new.weight.copy_(conv.weight.sum(1, keepdim=True).repeat(1, in_channels, 1, 1)
                                     / in_channels)
                    if conv.bias is not None:
                        new.bias.copy_(conv.bias)
            _set_submodule(model, qualified, new)
            return
    raise ModelError(f"cannot adapt {name!r} to {in_channels}-channel input (no 3-channel Conv2d found)")


def _set_submodule(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent, _, child = qualified.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
