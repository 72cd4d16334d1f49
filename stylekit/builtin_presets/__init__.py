"""Built-in style presets shipped with stylekit (TOML files and their style images)."""
