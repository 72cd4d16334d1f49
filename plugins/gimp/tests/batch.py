# Run inside GIMP 3 by tests/test_gimp.py (gimp-console-3.0 --batch-interpreter=python-fu-eval):
# builds a two-layer image, calls the Style Transfer procedure through the PDB, and writes what it
# finds (layer stack, offsets, raw pixels, masks, error messages) for the test to check outside GIMP.
import json
import os

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

WORK = os.environ["STYLEKIT_GIMP_WORK"]  # the test's folder, as seen inside the chroot
with open(os.path.join(WORK, "spec.json")) as spec:
    SPEC = json.load(spec)
PROCEDURE = Gimp.get_pdb().lookup_procedure("plug-in-stylekit-style-transfer")
PRECISION = SPEC.get("precision")  # a Gimp.Precision name: the image is converted to it first
PIXELS = "R'G'B'A u16" if PRECISION else "R'G'B'A u8"  # how layers are dumped
report = {"registered": PROCEDURE is not None, "calls": [], "bits": 16 if PRECISION else 8}


def load(path):
    return Gio.File.new_for_path(os.path.join(WORK, path))


def dump(drawable, name, babl_format=PIXELS):
    """Write a drawable's pixels raw (its own size) and return their file name."""
    rect = Gegl.Rectangle.new(0, 0, drawable.get_width(), drawable.get_height())
    data = drawable.get_buffer().get(rect, 1.0, babl_format, Gegl.AbyssPolicy.CLAMP)
    with open(os.path.join(WORK, name), "wb") as stream:
        stream.write(bytes(data))
    return name


def describe(image, label):
    """The layer stack, top first, with pixels and masks dumped under label-N names."""
    layers = []
    for index, layer in enumerate(image.get_layers()):
        mask = layer.get_mask()
        layers.append({"name": layer.get_name(), "offsets": list(layer.get_offsets()[1:]),
                       "size": [layer.get_width(), layer.get_height()],
                       "pixels": dump(layer, f"{label}-{index}.rgba"),
                       "mask": dump(mask, f"{label}-{index}.mask", "Y u8") if mask else None})
    return layers


def call(image, layer, run_mode=Gimp.RunMode.NONINTERACTIVE, **arguments):
    """Run the procedure on one layer; returns the status nick and any error message."""
    config = PROCEDURE.create_config()
    config.set_property("run-mode", run_mode)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for name, value in arguments.items():
        config.set_property(name.replace("_", "-"), value)
    result = PROCEDURE.run(config)
    status = result.index(0)
    message = result.index(1) if status != Gimp.PDBStatusType.SUCCESS and result.length() > 1 else None
    return {"status": status.value_nick, "message": message}


if PROCEDURE is not None:
    image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, load("base.png"))
    if PRECISION:  # before the top layer comes in, so a 16-bit top.png keeps its 16 bits
        image.convert_precision(getattr(Gimp.Precision, PRECISION))
    top = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image, load("top.png"))
    image.insert_layer(top, None, 0)
    top.set_offsets(*SPEC["offsets"])
    report["before"] = describe(image, "before")

    # 1. a preset, NONINTERACTIVE, on the second layer (alpha and an offset), or on the background
    first = image.get_layers()[-1] if SPEC.get("first_on_background") else top
    report["calls"].append(call(image, first, preset=SPEC["preset"], quality="fast",
                                **SPEC.get("first_arguments", {})))
    report["after_preset"] = describe(image, "preset")

    if not SPEC.get("first_call_only"):  # the warning test needs only one run
        # 2. a style image with a selection
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *SPEC["selection"])
        report["calls"].append(call(image, top, preset="", quality="fast", style_file=load("painting.png")))
        Gimp.Selection.none(image)
        report["after_selection"] = describe(image, "selection")

        # 3. WITH_LAST_VALS (as Filters ▸ Repeat runs it): no dialog; with no interactive run stored
        #    yet, GIMP hands over the values given here
        report["calls"].append(call(image, top, Gimp.RunMode.WITH_LAST_VALS, preset="", quality="fast",
                                    style_file=load("painting.png"), preserve_colors=True))
        report["after_repeat"] = describe(image, "repeat")

        # 4. failures come back as messages
        report["calls"].append(call(image, top, preset="no-such-preset"))
        report["calls"].append(call(image, top, preset=""))
        grey = Gimp.Image.new(32, 32, Gimp.ImageBaseType.GRAY)
        grey_layer = Gimp.Layer.new(grey, "grey", 32, 32, Gimp.ImageType.GRAY_IMAGE, 100,
                                    Gimp.LayerMode.NORMAL)
        grey.insert_layer(grey_layer, None, 0)
        report["calls"].append(call(grey, grey_layer, preset=SPEC["preset"]))
        report["layers_at_end"] = len(image.get_layers())
        grey.delete()

        # 5. a layer with a mask of its own, and a selection: both mask the result
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *SPEC["mask"])
        top.add_mask(top.create_mask(Gimp.AddMaskType.SELECTION))
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *SPEC["selection"])
        report["calls"].append(call(image, top, preset=SPEC["preset"], quality="fast"))
        report["after_mask"] = describe(image, "mask")

        # 6. both a preset and a style image: the style image wins
        report["calls"].append(call(image, top, preset=SPEC["preset"], quality="fast",
                                    style_file=load("painting.png")))
        report["after_both"] = describe(image, "both")

        # 7. a layer inside a layer group: the result goes into that group, right above it
        group = Gimp.GroupLayer.new(image, "group")
        image.insert_layer(group, None, 0)
        inner = top.copy()
        image.insert_layer(inner, group, 0)
        inner.set_name("inner")
        report["calls"].append(call(image, inner, preset=SPEC["preset"], quality="fast"))
        report["in_group"] = [layer.get_name() for layer in group.get_children()]

        # 8. a selection that misses the layer, and a floating selection: refused, nothing added
        small = Gimp.Layer.new(image, "small", 20, 20, Gimp.ImageType.RGBA_IMAGE, 100, Gimp.LayerMode.NORMAL)
        image.insert_layer(small, None, 0)
        small.set_offsets(0, 0)
        image.select_rectangle(Gimp.ChannelOps.REPLACE, image.get_width() - 4, image.get_height() - 4, 3, 3)
        report["calls"].append(call(image, small, preset=SPEC["preset"], quality="fast"))
        image.select_rectangle(Gimp.ChannelOps.REPLACE, 0, 0, 16, 16)
        floating = Gimp.Selection.float(image, [small], 2, 2)
        report["calls"].append(call(image, floating, preset=SPEC["preset"], quality="fast"))
        Gimp.floating_sel_anchor(floating)
        Gimp.Selection.none(image)
        report["layers_after_refusals"] = [layer.get_name() for layer in image.get_layers()]

        # 9. the result is seen the way its source is: the source's opacity and blend mode
        small.set_opacity(40.0)
        small.set_mode(Gimp.LayerMode.MULTIPLY)
        report["calls"].append(call(image, small, preset=SPEC["preset"], quality="fast"))
        result = image.get_layers()[0]
        report["result_look"] = [result.get_name(), result.get_opacity(), result.get_mode().value_nick]
    image.delete()

with open(os.path.join(WORK, "report.json"), "w") as stream:
    json.dump(report, stream, indent=1)
