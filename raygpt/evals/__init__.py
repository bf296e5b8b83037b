"""Evaluations of a trained model beyond its own validation loss.

- scoring.py: the one model call both evals make, the log-likelihood of token spans;
- hellaswag.py: HellaSwag data (downloaded once, checked by sha256), rendering under
  both conventions (build-nanogpt/llm.c and lm-evaluation-harness) and accuracy;
- perplexity.py: a contiguous sweep over a prepared split;
- workers.py: the Ray side, spreading span scoring over workers that load the model once;
- during_training.py: HellaSwag on the live model inside the training loop, sharded over
  its ranks (torch.distributed, not Ray).

Only workers.py knows Ray: the rest takes a model and token ids, so tests run it as is.
"""
