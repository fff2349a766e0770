"""Checkpoints of the cloud and of the devices' state, and continuing a run from them."""
