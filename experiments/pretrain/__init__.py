"""The run's network and the cloud's pre-training on the proxy part, cached by configuration."""
