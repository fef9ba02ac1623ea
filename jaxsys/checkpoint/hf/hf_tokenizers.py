"""jaxsys's byte and char tokenizers as Hugging Face tokenizers (`tokenizer.json` of the
`tokenizers` library + `tokenizer_config.json`), so `AutoTokenizer` gives the same ids.

bytes: a byte-level BPE with the 256 single-byte tokens and no merges, GPT-2's byte-to-unicode
alphabet, no regex split and no prefix space: id i is byte i both ways. chars: a BPE over the
run's characters with no merges and no pre-tokenizer, so each character is its id. Plain ids
(a `.bin` corpus) have no text to give back: nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def write(tokenizer_json: dict, seq_len: int, out: Path) -> list[str]:
    """Write the Hugging Face form of a jaxsys tokenizer (`Tokenizer.to_json()`) into `out`;
    returns the file names, or [] when there is none (plain ids, or no `tokenizers`)."""
    kind = tokenizer_json.get("kind")
    if kind not in ("byte", "char"):
        return []
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return []
    if kind == "byte":
        alphabet = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        chars = tokenizer_json["chars"]
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
