"""The research lab: the toy world, its training and benchmarks; imports detailpp, never imported by it."""
