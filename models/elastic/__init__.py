"""ElasticDNN (seed 003): the FBS-gated master, its domain bank, surrogates, retraining and the scheduler."""
