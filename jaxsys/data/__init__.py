"""Data: tokenizers, the training text, prepared datasets, and deterministic batches.

- `tokenizers`: byte, character, plain-id and Hugging Face tokenizers, their JSON form, and
  `save_tokenizer` / `load_tokenizer` for a run or dataset directory;
- `bpe`: training a byte-level BPE (`jaxsys tokenizer train`);
- `documents`: reading documents from text, JSONL and Parquet files (globs, one-line errors);
- `prepare`, `dataset`: `jaxsys data prepare` and the dataset directory it writes and reads;
- `packing`: the segment keys of a row (segment_ids, positions, loss_mask) and `Mixture`;
- `corpus`: the sources (shipped Shakespeare in `assets/`, a text file, a ``.bin`` of tokens,
  prepared directories), the train/validation split and `check_corpus`;
- `batches`: the batch of a step as a pure function of (seed, step), sharded on arrival.

Imports only `jaxsys.config`.
"""
