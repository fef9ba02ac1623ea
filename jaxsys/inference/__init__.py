"""Inference: loading a trained run and generating from it. Never imports the training loop.

- `load`: config, tokenizer and parameters of a run directory's newest checkpoint;
- `sampling`: autoregressive decoding with temperature and top-k;
- `evaluate`: `jaxsys eval`, loss, perplexity and bits per byte on the val split or a text file.
"""
