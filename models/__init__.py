"""Neural models for the recipes (installed as ``fbrain.models``)."""
