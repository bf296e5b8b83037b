"""Learning-rate transfer: the best learning rate at one size with its interval (fit),
its trend across sizes and the target's prediction (trend), a law over sweeps (law,
law_rows, law_outputs), and a transfer sweep's plan, analysis and files (plan, analysis,
outputs)."""
