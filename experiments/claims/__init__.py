"""The papers' presets: each re-runs a paper's table on the embedded data and writes it into docs/."""
