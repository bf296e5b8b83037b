"""Datasets: sources, tokenizers, token shards, preparation, and batches.

Where each concern lives:

* ``sources``   -- where text comes from: registered datasets, files, downloads.
* ``hub_corpora`` -- the large named corpora, from the Hugging Face Hub (fineweb_edu,
                   openwebtext).
* ``tokenizers`` -- characters, GPT-2 BPE (tiktoken, offline-safe), and a byte-level
                   BPE trained on the dataset (Hugging Face tokenizers).
* ``shards``    -- llm.c's token shard format (header of 256 int32, then the tokens).
* ``manifest``  -- a dataset folder (raygpt's manifest.json, bare llm.c shards, or
                   nanoGPT's train.bin/val.bin) read into one description: `load_meta`.
* ``prepare``   -- small datasets, tokenized in this process into the local cache.
* ``inputs`` and ``corpus`` -- large corpora: input files and their work units, and
                   the Ray Data pipeline that tokenizes them across the cluster.
* ``sampler``   -- deterministic, rank-disjoint, resumable batches over the shards.
* ``cli``       -- ``python -m raygpt.data list | prepare | verify``.

Callers import each name from the module that owns it (``from raygpt.data import
prepare`` then ``prepare.prepare_from_config(cfg)``).
"""
