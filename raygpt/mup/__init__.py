"""muP tools: the coordinate check of a parametrization (`python -m raygpt.mup`)."""
