"""The simulated fleet: device classes, sampled budgets, real devices' budgets and profiling, fault injection."""
