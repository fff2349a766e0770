"""The simulation runtime: the only code that touches Flower's simulation API and its internals."""
