"""Inference: loading a trained run and generating from it. Never imports the training loop.

- `load`: config, tokenizer and parameters of a run directory's newest checkpoint;
- `sampler`: logits processing (temperature, top-k, top-p, min-p, penalties) and sampling;
- `decode`: the KV-cache engine: batched prefill, a compiled decode loop, stop ids, sliding;
- `speculative_rule` / `speculative`: modified rejection sampling, and decoding with a draft;
- `quantize`: int8 weight-only quantization (per output channel), dequantized at use;
- `sampling`: text in, text out (stop strings), and the no-cache baseline sampler;
- `evaluate`: `jaxsys eval`, loss, perplexity and bits per byte on the val split or a text file.
"""
