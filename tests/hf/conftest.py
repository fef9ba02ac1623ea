"""Saved tiny Hugging Face models shared by the tests of this folder (built once per session)."""

import pytest

from tests.hf import models


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """name -> (folder, transformers logits of `models.TOKENS_BT`), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = folder, models.logits(models.build(name, folder))
        return cache[name]
    return get
