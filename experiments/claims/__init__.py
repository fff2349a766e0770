"""The papers' presets: each re-runs a paper's table on the embedded data and writes it into docs/."""

#: The data and pre-training scale every preset runs at, pinned so that the quick start's
#: defaults (conf/, sized for a first run of minutes) never move a paper's table.
PRESET_SCALE = ("dataset.proxy_samples=3000", "pretrain.epochs=10")
