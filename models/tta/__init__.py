"""The online test-time-adaptation baselines of CEMA: one adapter contract, one module per method family."""
