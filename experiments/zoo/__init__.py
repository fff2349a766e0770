"""The zoo: every registered algorithm run with its name alone, and what each one did.

``python -m experiments.zoo`` runs ``python -m experiments.run algorithm=<name>`` for every
plug-in of :mod:`experiments.algorithms` (no other override: the quick start's size, the
algorithm's own scenario and network), reuses runs that already finished with the same
configuration, and writes docs/ALGORITHMS.md: accuracy before and after adaptation on the same
devices, traffic, virtual and wall time, and one line of reason beside every row whose
adaptation did not help.
"""
