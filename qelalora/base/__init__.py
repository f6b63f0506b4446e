"""The frozen base: loading and NF4-quantising a model, finding its target linears, embedded models, the hub, and the base's memory footprint."""
