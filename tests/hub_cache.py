"""Test helper: point huggingface_hub at a hand-made Hub cache, offline (fill it with
``timm_capsules.hub.install_in_cache``)."""

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def offline_hub_cache(cache_dir: Union[str, os.PathLike]) -> Iterator[Path]:
    """Sets ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` and restores both on exit. huggingface_hub reads these
    variables once, at import, into ``huggingface_hub.constants``, so both the environment (for child
    processes) and the constants (for this process) are set."""
    from huggingface_hub import constants

    env = {'HF_HUB_CACHE': str(cache_dir), 'HF_HUB_OFFLINE': '1'}
    saved_env = {key: os.environ.get(key) for key in env}
    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    os.environ.update(env)
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), True
    try:
        yield Path(cache_dir)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
