"""Training: one loop for every rank, and `python -m raygpt.train`, which runs it."""
