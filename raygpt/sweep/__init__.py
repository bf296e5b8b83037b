"""Sweeps: Ray Tune over optimizer x learning rate, and `python -m raygpt.sweep`."""
