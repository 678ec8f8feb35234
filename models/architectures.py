"""Network definitions: the triage classifier (pluggable backbone) and the lung U-Net.

Layer names `features` (last convolutional map) and `logits` (pre-softmax scores) are part
of the contract: Grad-CAM and temperature scaling in `models.inference` look them up.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from keras import layers

FEATURES_LAYER = "features"
LOGITS_LAYER = "logits"


@dataclass(frozen=True)
class BackboneSpec:
    """A keras.applications constructor and how it wants its [0, 1] grayscale input scaled."""

    build: Callable[..., Any]
    scale: float
    offset: tuple[float, float, float]
    divisor: tuple[float, float, float]


def _applications() -> dict[str, BackboneSpec]:
    apps = keras.applications
    caffe = BackboneSpec(apps.ResNet50, 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
    torch = BackboneSpec(apps.DenseNet121, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return {
        "resnet50": caffe,
        "densenet121": torch,
        "efficientnetb0": BackboneSpec(apps.EfficientNetB0, 255.0, (0, 0, 0), (1, 1, 1)),
        "mobilenetv2": BackboneSpec(apps.MobileNetV2, 2.0, (1.0, 1.0, 1.0), (1, 1, 1)),
    }


BACKBONES = ("cxrnet", "resnet50", "densenet121", "efficientnetb0", "mobilenetv2")


def _conv_bn_relu(x: Any, filters: int, name: str, strides: int = 1) -> Any:
    x = layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def cxrnet(x: Any, widths: tuple[int, ...] = (32, 64, 128, 256)) -> Any:
    """Compact conv/BN/ReLU backbone trainable from scratch on two CPU cores.

    A stride-2 stem, then per stage two 3x3 convolutions and a 2x2 max-pool; the last stage
    is not pooled so Grad-CAM keeps a usable resolution (input / 16).
    """
    x = _conv_bn_relu(x, widths[0], "stem", strides=2)
    for i, width in enumerate(widths):
        x = _conv_bn_relu(x, width, f"stage{i + 1}a")
        x = _conv_bn_relu(x, width, f"stage{i + 1}b")
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(2, name=f"stage{i + 1}_pool")(x)
    return x


def build_classifier(
    input_size: int,
    backbone: str = "cxrnet",
    *,
    backbone_weights: Path | None = None,
    n_classes: int = 2,
    dense_units: tuple[int, int] = (128, 64),
    widths: tuple[int, ...] = (32, 64, 128, 256),
) -> keras.Model:
    """Backbone + global average pooling + two dense ReLU layers with dropout 0.5 + softmax.

    Input is (input_size, input_size, 1) in [0, 1]; keras.applications backbones get the
    grayscale channel repeated and rescaled to what their pretrained weights expect, and
    load `backbone_weights` from disk (never downloaded).
    """
    inputs = keras.Input((input_size, input_size, 1), name="image")
    if backbone == "cxrnet":
        if backbone_weights is not None:
            raise ValueError("cxrnet has no pretrained weights; train it from scratch")
        feats = cxrnet(inputs, widths)
    elif backbone in BACKBONES:
        spec = _applications()[backbone]
        x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
        x = layers.Rescaling(spec.scale, name="backbone_scale")(x)
        x = layers.Normalization(
            mean=list(spec.offset),
            variance=[d * d for d in spec.divisor],
            name="backbone_norm",
        )(x)
        net = spec.build(
            include_top=False,
            weights=str(backbone_weights) if backbone_weights else None,
            input_tensor=x,
        )
        feats = net.output
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    feats = layers.Activation("linear", name=FEATURES_LAYER)(feats)
    x = layers.GlobalAveragePooling2D(name="gap")(feats)
    for i, units in enumerate(dense_units):
        x = layers.Dense(units, activation="relu", name=f"dense{i + 1}")(x)
        x = layers.Dropout(0.5, name=f"dropout{i + 1}")(x)
    logits = layers.Dense(n_classes, name=LOGITS_LAYER)(x)
    probs = layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, probs, name=f"classifier_{backbone}")


def _double_conv(x: Any, filters: int, name: str) -> Any:
    x = _conv_bn_relu(x, filters, f"{name}a")
    return _conv_bn_relu(x, filters, f"{name}b")


def build_unet(input_size: int, base_filters: int = 64, depth: int = 3) -> keras.Model:
    """U-Net: encoder 64-128-256 doubling to a 512 bottleneck, skip concatenation, 1x1 sigmoid.

    With the defaults this is 7.7M parameters; `base_filters`/`depth` exist for tests.
    """
    inputs = keras.Input((input_size, input_size, 1), name="image")
    skips = []
    x = inputs
    for level in range(depth):
        x = _double_conv(x, base_filters * 2**level, f"enc{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _double_conv(x, base_filters * 2**depth, "bottleneck")
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level + 1}_up")(x)
        x = layers.Concatenate(name=f"dec{level + 1}_skip")([x, skips[level]])
        x = _double_conv(x, filters, f"dec{level + 1}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inputs, outputs, name="unet")


def build_from_metadata(task: str, input_size: int, architecture: dict[str, Any]) -> keras.Model:
    """Rebuild the network a metadata file describes (weights are loaded separately)."""
    if task == "classification":
        arch = dict(architecture)
        arch.pop("backbone_weights", None)  # only needed at training time
        for key in ("dense_units", "widths"):
            if key in arch:
                arch[key] = tuple(arch[key])
        return build_classifier(input_size, **arch)
    if task == "segmentation":
        return build_unet(input_size, **architecture)
    raise ValueError(f"unknown task {task!r}")
