# Run inside GUI GIMP 3 (under Xvfb) by tests/test_gimp.py: opens the Style Transfer dialog
# INTERACTIVE (the test presses Return on it), then repeats WITH_LAST_VALS without any arguments,
# and writes each call's status and the layer names for the test to check.
import json
import os

import gi

gi.require_version("Gimp", "3.0")
from gi.repository import Gimp, Gio  # noqa: E402

WORK = os.environ["STYLEKIT_GIMP_WORK"]
image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(os.path.join(WORK, "base.png")))
Gimp.Display.new(image)
procedure = Gimp.get_pdb().lookup_procedure("plug-in-stylekit-style-transfer")
calls = []
for run_mode, quality in ((Gimp.RunMode.INTERACTIVE, "fast"), (Gimp.RunMode.WITH_LAST_VALS, "best")):
    config = procedure.create_config()
    config.set_property("run-mode", run_mode)
    config.set_property("image", image)
    config.set_core_object_array("drawables", image.get_layers()[-1:])
    config.set_property("quality", quality)  # shown in the dialog; WITH_LAST_VALS must ignore it
    result = procedure.run(config)
    calls.append({"status": result.index(0).value_nick,
                  "layers": [layer.get_name() for layer in image.get_layers()]})
with open(os.path.join(WORK, "interactive.json"), "w") as stream:
    json.dump(calls, stream)
