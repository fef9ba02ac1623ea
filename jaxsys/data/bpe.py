"""Training a byte-level BPE tokenizer on the user's text, with Hugging Face ``tokenizers``.

Byte-level (GPT-2 style): every UTF-8 byte is in the base alphabet, so any text encodes with no
unknown token, and decoding gives the text back exactly. `ENDOFTEXT` is the one special token
(id 0), recorded as bos and eos in ``tokenizer_config.json``, which also makes the folder load
in `transformers.AutoTokenizer`. Training is deterministic: the same files and settings give
the same ``tokenizer.json`` bytes (tests/data/test_tokenizers.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsys.config import ConfigError
from jaxsys.data.documents import read_documents
from jaxsys.data.tokenizers import INSTALL, HFTokenizer

ENDOFTEXT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet and the special token


def train_bpe(files: list[Path], vocab_size: int, *, field: str = "text", doc_sep: str | None = None,
              min_frequency: int = 2, special_tokens: tuple[str, ...] = (ENDOFTEXT,)) -> HFTokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (ids; fewer when the text has fewer
    merges to offer) trained on the documents of `files` (`documents.read_documents`)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ConfigError(f"`jaxsys tokenizer train` needs the `tokenizers` package: {INSTALL}.") from None
    if vocab_size < MIN_VOCAB + len(special_tokens) - 1:
        raise ConfigError(f"--vocab-size {vocab_size} is below the {256 + len(special_tokens)} tokens a "
                          "byte-level BPE starts with (256 bytes + special tokens); use e.g. 4096.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def documents():
        for path in files:
            yield from read_documents(path, field, doc_sep)

    tok.train_from_iterator(documents(), trainer=trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special_tokens[0],
              "eos_token": special_tokens[0], "unk_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000}
    return HFTokenizer({"tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
                        "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8")})


def write_hf_dir(tokenizer: HFTokenizer, out: str | Path) -> Path:
    """Write `tokenizer`'s Hugging Face files into folder `out` (created); returns it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the tokenizer files.")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer.files.items():
        (out / name).write_bytes(data)
    return out
