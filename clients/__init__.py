"""The edge: one handler per algorithm; Flower messages in, replies out."""
