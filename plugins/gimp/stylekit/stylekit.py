#!/usr/bin/env python3
"""GIMP 3 plug-in: Filters ▸ Artistic ▸ Style Transfer…, computed by a local stylekit server.

Runs in GIMP's own Python with the standard library only; torch lives in the server
(`stylekit serve`), which this plug-in starts when none answers. Install: `stylekit gimp install`.
"""

import os
import sys
import tempfile

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
import stylekit_client as client  # noqa: E402  (beside this file; GIMP puts its folder on sys.path)
from gi.repository import Gegl, Gimp, Gio, GLib, GObject  # noqa: E402

PROCEDURE = "plug-in-stylekit-style-transfer"
HERE = os.path.dirname(os.path.abspath(__file__))
PIXELS = {8: "R'G'B'A u8", 16: "R'G'B'A u16"}  # pixels travel as sRGB with straight alpha, by bits
EIGHT_BIT = (Gimp.Precision.U8_LINEAR, Gimp.Precision.U8_NON_LINEAR, Gimp.Precision.U8_PERCEPTUAL)
QUALITY_LABELS = (("fast", "Fast", "50 steps, from a quarter of the size up"),
                  ("balanced", "Balanced", "150 steps, from half the size up"),
                  ("best", "Best", "300 steps, from half the size up"))


def fail(procedure, message, status=Gimp.PDBStatusType.EXECUTION_ERROR):
    """Return an error GIMP shows to the user (or hands to the calling script)."""
    return procedure.new_return_values(status, GLib.Error(message))


def channel_bits(image):
    """8 for an 8-bit image, 16 for a deeper one (16 or 32-bit integer, half or float): the bits per
    channel its pixels travel in, so a photographer's 16-bit or float image keeps its precision."""
    return 8 if image.get_precision() in EIGHT_BIT else 16


def read_rgba(drawable, bits):
    """A drawable's pixels as packed R'G'B'A samples of bits each."""
    rect = Gegl.Rectangle.new(0, 0, drawable.get_width(), drawable.get_height())
    return bytes(drawable.get_buffer().get(rect, 1.0, PIXELS[bits], Gegl.AbyssPolicy.CLAMP))


def read_scaled(image, drawable, bits, width, height):
    """A drawable's pixels scaled by GIMP to width × height, in a scratch image of the same precision:
    a plug-in's scaled buffer read (Gegl.Buffer.get at a scale under 1) gives transparent black."""
    if (width, height) == (drawable.get_width(), drawable.get_height()):
        return read_rgba(drawable, bits)
    scratch = Gimp.Image.new_with_precision(width, height, Gimp.ImageBaseType.RGB, image.get_precision())
    try:
        copy = Gimp.Layer.new_from_drawable(drawable, scratch)
        scratch.insert_layer(copy, None, 0)
        copy.scale(width, height, False)
        return read_rgba(copy, bits)
    finally:
        scratch.delete()


def write_rgba(drawable, data, bits):
    """Replace a drawable's pixels with packed R'G'B'A samples of bits each."""
    width, height = drawable.get_width(), drawable.get_height()
    buffer = drawable.get_buffer()
    buffer.set(Gegl.Rectangle.new(0, 0, width, height), PIXELS[bits], data)
    buffer.flush()
    drawable.update(0, 0, width, height)


def show_dialog(procedure, config, presets):
    """The dialog: a preset list from the server, then the procedure's own arguments. It shows what
    will be used: a chosen style image empties the preset, and picking a preset drops the style image."""
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from gi.repository import GimpUi, Gtk

    GimpUi.init(PROCEDURE)
    if config.get_property("style-file") is not None:
        config.set_property("preset", "")  # the style image wins (choose_style)
    elif not config.get_property("preset") and presets:
        config.set_property("preset", presets[0]["name"])
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Style Transfer")
    store = Gtk.ListStore(str, str)
    store.append(["", "None: use the style image below"])
    for preset in presets:
        store.append([preset["name"], preset["title"]])
    combo = GimpUi.prop_string_combo_box_new(config, "preset", store, 0, 1)
    label = Gtk.Label.new_with_mnemonic("_Preset")
    label.set_mnemonic_widget(combo)
    row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
    row.pack_start(label, False, False, 0)
    row.pack_start(combo, True, True, 0)
    dialog.fill(["style-file", "strength", "quality", "max-size", "preserve-colors"])

    def style_picked(*_):
        if config.get_property("style-file") is not None:
            config.set_property("preset", "")

    def preset_picked(*_):
        if config.get_property("preset"):
            config.set_property("style-file", None)

    config.connect("notify::style-file", style_picked)  # after fill: the widgets are set up by now
    config.connect("notify::preset", preset_picked)
    content = dialog.get_content_area()
    content.pack_start(row, False, False, 0)
    content.reorder_child(row, 0)
    row.show_all()
    accepted = dialog.run()
    dialog.destroy()
    return accepted


def choose_style(config):
    """(preset, style) to send: a chosen style image wins over the preset, in every run mode (the
    preset is then ''), so what the user picked explicitly is what they get; style is (file name,
    bytes) or None."""
    style_file = config.get_property("style-file")
    if style_file is None:
        return config.get_property("preset"), None
    path = style_file.get_path()
    if path is None:  # a remote place (https://, sftp://): the server is sent bytes read here
        raise client.ClientError(f"The style image must be a file on this computer, not "
                                 f"{style_file.get_uri()}: copy it here first.")
    try:
        with open(path, "rb") as handle:
            return "", (os.path.basename(path), handle.read())
    except OSError as exc:
        raise client.ClientError(f"Cannot read the style image {path} ({exc.strerror or exc}).") from None


def insert_result(image, source, png, source_rgba, bits, name):
    """Add the result above the source: same size and offsets, the source's alpha (source_rgba: its
    pixels at bits per channel), the selection and the source's mask as mask."""
    handle, path = tempfile.mkstemp(prefix="stylekit-", suffix=".png")
    image.undo_group_start()
    inserted = None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(png)
        layer = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path))
        layer.set_name(name)
        image.insert_layer(layer, source.get_parent(), image.get_item_position(source))
        inserted = layer
        finish_layer(image, source, layer, source_rgba, bits)
    except BaseException:
        if inserted is not None:  # no half-made layer left in the image beside the error
            image.remove_layer(inserted)
        raise
    finally:
        image.undo_group_end()
        os.unlink(path)
    Gimp.displays_flush()


def finish_layer(image, source, layer, source_rgba, bits):
    """Give the inserted result the source's size, offsets, alpha, opacity and mode, and its mask;
    select it."""
    width, height = source.get_width(), source.get_height()
    _, x, y = source.get_offsets()
    if (layer.get_width(), layer.get_height()) != (width, height):
        layer.scale(width, height, False)
    layer.set_offsets(x, y)
    layer.set_opacity(source.get_opacity())  # it stands in for the source: seen the way the source is
    layer.set_mode(source.get_mode())
    if not layer.has_alpha():
        layer.add_alpha()
    pixels = bytearray(read_rgba(layer, bits))
    sample = bits // 8  # bytes per channel
    for byte in range(3 * sample, 4 * sample):  # each byte of every pixel's alpha
        pixels[byte::4 * sample] = source_rgba[byte::4 * sample]
    write_rgba(layer, bytes(pixels), bits)
    add_mask(image, source, layer)
    image.set_selected_layers([layer])


def selection_touches(image, layer):
    """Whether the selection, if there is one, overlaps the layer (else its result would be masked
    away entirely)."""
    _, selected, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    if not selected:
        return True
    _, x, y = layer.get_offsets()
    return x1 < x + layer.get_width() and x < x2 and y1 < y + layer.get_height() and y < y2


def add_mask(image, source, layer):
    """Mask the result with the selection and the source's own mask, where there are any: what the
    source's mask hides stays hidden."""
    selected = Gimp.Selection.bounds(image)[1]
    source_mask = source.get_mask() if source.get_apply_mask() else None
    if selected or source_mask:
        mask = layer.create_mask(Gimp.AddMaskType.SELECTION if selected else Gimp.AddMaskType.WHITE)
        layer.add_mask(mask)
        if source_mask:
            mask.combine_masks(source_mask, Gimp.ChannelOps.INTERSECT, 0, 0)


def stylize_layer(procedure, run_mode, image, drawables, config):
    """The procedure's work; raises client.ClientError with a message for the user."""
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
        return fail(procedure, "Select exactly one layer (not a mask or channel), then run Style Transfer "
                               "again.", Gimp.PDBStatusType.CALLING_ERROR)
    if image.get_base_type() != Gimp.ImageBaseType.RGB:
        return fail(procedure, "Style Transfer works on RGB images: choose Image ▸ Mode ▸ RGB, then run "
                               "it again.", Gimp.PDBStatusType.CALLING_ERROR)
    source = drawables[0]
    if source.is_floating_sel():
        return fail(procedure, "Anchor the floating selection first (Layer ▸ Anchor Layer), or make it a "
                               "layer of its own (Layer ▸ To New Layer).", Gimp.PDBStatusType.CALLING_ERROR)
    if not selection_touches(image, source):
        return fail(procedure, "The selection does not touch this layer, so the result would be hidden: "
                               "select part of the layer, or Select ▸ None.",
                    Gimp.PDBStatusType.CALLING_ERROR)
    server = client.Client(client.load_config(HERE))
    Gimp.progress_init("Style Transfer: connecting to the stylekit server")
    client.ensure_server(server, on_wait=Gimp.progress_pulse)
    max_pixels = server.health().get("max_pixels")
    presets = server.presets()
    if run_mode == Gimp.RunMode.INTERACTIVE and not show_dialog(procedure, config, presets):
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, None)
    preset, style = choose_style(config)
    if not preset and style is None:
        return fail(procedure, "Choose a preset or a style image (arguments 'preset' or 'style-file').",
                    Gimp.PDBStatusType.CALLING_ERROR)
    titles = {p["name"]: p["title"] for p in presets}
    if preset and preset not in titles:
        return fail(procedure, f"The stylekit server has no preset '{preset}'; it offers: "
                               f"{', '.join(titles) or 'none'}.", Gimp.PDBStatusType.CALLING_ERROR)
    width, height = client.working_size(source.get_width(), source.get_height(),
                                        config.get_property("max-size"), max_pixels)
    params = client.job_params(preset, config.get_property("strength"), config.get_property("quality"),
                               config.get_property("preserve-colors"), width, height)
    Gimp.progress_set_text("Style Transfer: waiting for the server")

    def on_progress(fraction, message):
        Gimp.progress_set_text(f"Style Transfer: {message}")
        Gimp.progress_update(fraction)

    bits = channel_bits(image)
    upload = client.encode_png(width, height, read_scaled(image, source, bits, width, height), bits)
    png, warnings = client.run_job(server, upload, params, style, on_progress)
    name = titles[preset] if preset else os.path.splitext(style[0])[0]
    insert_result(image, source, png, read_rgba(source, bits), bits, name)
    Gimp.progress_end()
    for message in warnings:  # GIMP heads each with the plug-in's name ("Style Transfer")
        Gimp.message(message)
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, None)


def run(procedure, run_mode, image, drawables, config, data):
    """Entry point: every failure becomes a GIMP error message, never a traceback."""
    try:
        return stylize_layer(procedure, run_mode, image, drawables, config)
    except client.ClientError as exc:
        return fail(procedure, str(exc))
    except Exception as exc:  # the user sees a message, not a traceback
        return fail(procedure, f"Style Transfer hit an unexpected problem ({type(exc).__name__}: {exc}). "
                               "Please report it to stylekit.")


class StyleTransfer(Gimp.PlugIn):
    """Declares the procedure; the work happens in run()."""

    def do_query_procedures(self):
        return [PROCEDURE]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        procedure.set_image_types("RGB*")
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_menu_label("_Style Transfer...")
        procedure.add_menu_path("<Image>/Filters/Artistic")
        procedure.set_documentation(
            "Paint the layer in the style of a painting (neural style transfer)",
            "Sends the layer to a local stylekit server (started when needed) and adds the result as a "
            "new layer above it, with the same size, offsets and transparency; an active selection "
            "and the layer's own mask become its layer mask. The style comes from the style image when "
            "one is chosen, otherwise from the preset.", name)
        procedure.set_attribution("stylekit", "stylekit", "2025")
        flags = GObject.ParamFlags.READWRITE
        procedure.add_string_argument("preset", "_Preset", "Preset name from the server, used when no "
                                                           "style image is chosen", "", flags)
        procedure.add_file_argument("style-file", "St_yle image", "A painting to take the style from; "
                                    "when chosen, it is used instead of the preset",
                                    Gimp.FileChooserAction.OPEN, True, None, flags)
        procedure.add_double_argument("strength", "S_trength", "Style weight, as a multiple of the "
                                                              "preset's", 0.05, 20.0, 1.0, flags)
        quality = Gimp.Choice.new()
        for index, (nick, label, help_text) in enumerate(QUALITY_LABELS):
            quality.add(nick, index, label, help_text)
        procedure.add_choice_argument("quality", "_Quality", "Fast, balanced or best (time vs. detail)",
                                      quality, "balanced", flags)
        procedure.add_int_argument("max-size", "Si_ze limit", "Longest side the server works at, in "
                                   "pixels; the result is scaled back to the layer", 64, 8192, 1024, flags)
        procedure.add_boolean_argument("preserve-colors", "Keep colo_urs", "Keep the layer's colours, "
                                       "take only the texture (off: as the preset says)", False, flags)
        return procedure


Gimp.main(StyleTransfer.__gtype__, sys.argv)
