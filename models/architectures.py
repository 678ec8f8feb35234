"""Network definitions: the triage classifier (pluggable backbone) and the lung U-Net.

Layer names `features` (last convolutional map) and `logits` (pre-softmax scores) are part
of the contract: Grad-CAM and temperature scaling in `models.inference` look them up. An
ensemble (`build_ensemble`) has one `member{i}_features` layer per member instead of
`features` (`feature_layers` names them) and one `logits` layer for the whole ensemble.
"""

from collections.abc import Callable, Sequence
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


def member_name(index: int) -> str:
    return f"member{index + 1}"


class HorizontalFlip(layers.Layer):  # type: ignore[misc]
    """Mirror an image batch (N, H, W, C) left-right; no weights."""

    def call(self, x: Any) -> Any:
        return keras.ops.flip(x, axis=2)


def build_ensemble(
    input_size: int,
    member_temperatures: Sequence[float],
    backbone: str = "cxrnet",
    *,
    hflip_tta: bool = False,
    **member_kwargs: Any,
) -> keras.Model:
    """Members of identical architecture averaged in one functional model.

    Each member is a `build_classifier` network split into a backbone sub-model
    (`member{i}_backbone`, image to features) and a head sub-model (`member{i}_head`,
    features to logits), joined by a `member{i}_features` identity layer so Grad-CAM can
    take gradients of the ensemble score with respect to each member's features. Member
    logits are divided by that member's own temperature (`member{i}_calibrated`), then
    averaged (`logits`), then softmaxed: the ensemble's logit is the mean of the members'
    calibrated logits (for two classes: the geometric mean of their calibrated odds).

    With `hflip_tta`, each member also scores the mirrored image (`image_flipped`, feature
    layer `member{i}_features_flipped`) and the mean runs over both views of every member.

    The temperatures are constants in the layer config, not weights. `get_weights()` order
    is Keras' (by graph depth: both backbones, then both heads), stable for a given build;
    `member_views` gives each member in `build_classifier` order, so a member trained
    alone can be loaded into its part.
    """
    if len(member_temperatures) < 2:
        raise ValueError("an ensemble needs at least two members")
    inputs = keras.Input((input_size, input_size, 1), name="image")
    views = [("", inputs)]
    if hflip_tta:
        views.append(("_flipped", HorizontalFlip(name="image_flipped")(inputs)))
    calibrated = []
    for i, temperature in enumerate(member_temperatures):
        single = build_classifier(input_size, backbone, **member_kwargs)
        name = member_name(i)
        features = single.get_layer(FEATURES_LAYER)
        body = keras.Model(single.input, features.output, name=f"{name}_backbone")
        head_in = keras.Input(tuple(features.output.shape[1:]), name=f"{name}_head_in")
        x = head_in
        names = [layer.name for layer in single.layers]
        head_layers = single.layers[names.index(FEATURES_LAYER) + 1 : names.index(LOGITS_LAYER) + 1]
        for layer in head_layers:
            x = layer(x)
        head = keras.Model(head_in, x, name=f"{name}_head")
        scale = 1.0 / float(temperature)
        for suffix, image in views:
            feats = layers.Activation("linear", name=f"{name}_features{suffix}")(body(image))
            calibrated.append(
                layers.Rescaling(scale, name=f"{name}_calibrated{suffix}")(head(feats))
            )
    logits = layers.Average(name=LOGITS_LAYER)(calibrated)
    probs = layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, probs, name=f"ensemble{len(member_temperatures)}_{backbone}")


def member_views(ensemble: keras.Model) -> list[keras.Model]:
    """One image-to-logits model per member, sharing the ensemble's variables.

    Their `get_weights()` order is `build_classifier`'s, so a member trained alone can be
    loaded into its part with `models.registry.load_weights`.
    """
    views = []
    i = 0
    while True:
        try:
            body = ensemble.get_layer(f"{member_name(i)}_backbone")
        except ValueError:
            break
        head = ensemble.get_layer(f"{member_name(i)}_head")
        views.append(keras.Model(body.input, head(body.output), name=member_name(i)))
        i += 1
    return views


def feature_layers(architecture: dict[str, Any]) -> list[tuple[str, bool]]:
    """Grad-CAM feature layers of a classifier: (name, whether it sees the mirrored image).

    One per member and view for an ensemble, just `features` for a single network.
    """
    n = int(architecture.get("ensemble", 0))
    if not n:
        return [(FEATURES_LAYER, False)]
    flips = (False, True) if architecture.get("hflip_tta") else (False,)
    return [
        (f"{member_name(i)}_features{'_flipped' if flip else ''}", flip)
        for i in range(n)
        for flip in flips
    ]


def build_from_metadata(task: str, input_size: int, architecture: dict[str, Any]) -> keras.Model:
    """Rebuild the network a metadata file describes (weights are loaded separately).

    A classifier with `"ensemble": n` in its architecture is `build_ensemble` with the
    `member_temperatures` (and `hflip_tta`) listed there.
    """
    if task == "classification":
        arch = dict(architecture)
        arch.pop("backbone_weights", None)  # only needed at training time
        for key in ("dense_units", "widths"):
            if key in arch:
                arch[key] = tuple(arch[key])
        n = int(arch.pop("ensemble", 0))
        if n:
            temperatures = [float(t) for t in arch.pop("member_temperatures")]
            if len(temperatures) != n:
                raise ValueError(f"ensemble of {n} with {len(temperatures)} member temperatures")
            tta = bool(arch.pop("hflip_tta", False))
            return build_ensemble(input_size, temperatures, hflip_tta=tta, **arch)
        return build_classifier(input_size, **arch)
    if task == "segmentation":
        return build_unet(input_size, **architecture)
    raise ValueError(f"unknown task {task!r}")
