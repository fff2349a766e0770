"""The cloud: Flower strategies on the Message API, one algorithm a file."""
