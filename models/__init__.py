"""Networks and their surgery, framework-free: plain torch, no Flower, nothing of the project above.

Build a network by name with :func:`models.catalog.build_model`.
"""
