"""Training objectives for the recipes (installed as ``fbrain.losses``)."""
