"""HeteroFL and FedRolex: width-scaled sub-models, their layers, local training and aggregation."""
