"""The GIMP 3 plug-in, shipped as data so `stylekit gimp install` can copy it into GIMP."""
