"""CEMA (seed 000): the edge's upload filter and the cloud's foundation adaptation and distillation."""
