"""Data: tokenizers, the training text, and deterministic batches.

- `tokenizers`: byte and character tokenizers and their JSON form;
- `corpus`: the sources (shipped Shakespeare in `assets/`, a text file, a ``.bin`` of tokens),
  the train/validation split and `check_corpus`;
- `batches`: the batch of a step as a pure function of (seed, step), sharded on arrival.

Imports only `jaxsys.config`.
"""
