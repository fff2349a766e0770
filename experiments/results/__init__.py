"""What a run leaves behind: results.json, its summary, the terminal progress, plots, atomic writes."""
