"""The algorithms a run can name: one plug-in module per algorithm family and the registry of them."""
