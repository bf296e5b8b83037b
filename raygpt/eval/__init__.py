"""Evaluation: HellaSwag and perplexity, during training and `python -m raygpt.eval`."""
