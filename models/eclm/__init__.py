"""ECLM (seed 001): the modular network, the unified module selector, the knapsack, ability-enhancing training."""
