"""Hugging Face weights in and out: a local `transformers` model folder (config.json +
safetensors) to a jaxsys run directory, and a run directory back to such a folder.

- `config_map`: config.json <-> `ModelConfig`; every refusal of an unsupported source;
- `names`: which Hugging Face tensor is which jaxsys parameter, and how its axes move;
- `files`: safetensors read one tensor at a time, written streamed (sharded, with the index);
- `importer`: `import_hf(src) -> (Config, params)`, `import_to_run_dir(src, out)`;
- `exporter`: `export_hf(run_dir, out)`; `hf_tokenizers`: byte/char tokenizers for AutoTokenizer.

It lives in `jaxsys.checkpoint` because it reads and writes checkpoints (Orbax and
safetensors) and places parameters with the rules of `jaxsys.parallel`, which sits below;
`jaxsys.cli.hf` is its command line. Needs the `hf` extra (safetensors); `transformers` and
`torch` are needed only by the tests.
"""

from jaxsys.checkpoint.hf.exporter import export_hf
from jaxsys.checkpoint.hf.importer import import_config, import_hf, import_to_run_dir

__all__ = ["export_hf", "import_config", "import_hf", "import_to_run_dir"]
