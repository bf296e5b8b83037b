"""raygpt: Ray-orchestrated GPT training and optimizer x learning-rate sweeps."""

__version__ = "0.1.0"
