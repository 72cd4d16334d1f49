"""The backbones' layer names and default layer sets, without torch: what options are checked
against (the CLI, presets and hot-folder configs check them before torch has loaded).

features.py builds the networks themselves from torchvision's definitions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """What the engine needs to know about a backbone: its layer names and default layer sets."""

    name: str
    layers: tuple[str, ...]
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]


# torchvision.models.vgg.cfgs "E" (VGG19) and "D" (VGG16): channels per convolution, "M" a max pool
# (tests check that these are torchvision's own).
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _vgg_layer_names(cfg: list[int | str]) -> list[str]:
    """Name every module of torchvision's VGG `features` the way the style-transfer papers do."""
    names: list[str] = []
    block, index = 1, 1
    for item in cfg:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


RESNET_LAYERS = ("conv1", "relu", "pool", "layer1", "layer2", "layer3", "layer4")
_GATYS_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

BACKBONES: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec("vgg19", tuple(_vgg_layer_names(VGG_CFGS["vgg19"])), ("relu4_2",),
                          _GATYS_STYLE),
    "vgg16": BackboneSpec("vgg16", tuple(_vgg_layer_names(VGG_CFGS["vgg16"])), ("relu4_2",),
                          _GATYS_STYLE),
    "resnet50": BackboneSpec("resnet50", RESNET_LAYERS, ("layer2",),
                             ("relu", "layer1", "layer2", "layer3")),
}


def backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name, with the list of valid names in the error."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})") from None
