# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""The transformers versions that this folder's files run under, and what differs between them.

This folder is copied next to every saved checkpoint (remote code), so its files run under whichever transformers
loads the checkpoint, not the one hf-moe requires. Importing this module refuses a transformers older than
`MIN_TRANSFORMERS_VERSION`, the oldest one the saved folders are tested with, with an ImportError naming both
versions: `configuration_hf_moe.py` imports it first, so that the refusal comes before another import or a class
definition fails less clearly. The names below hide the differences between the supported versions. Imports
transformers only.
"""

import inspect
import re

import transformers

MIN_TRANSFORMERS_VERSION = "5.14"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """ImportError unless `installed` (a transformers version) is at least `MIN_TRANSFORMERS_VERSION`."""
    if _major_minor(installed) < _major_minor(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"this model needs transformers >= {MIN_TRANSFORMERS_VERSION}, you have {installed}: its code (saved by "
            f"hf-moe next to the weights, loaded with trust_remote_code=True) was not written for older versions. "
            f"Upgrade with `pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'`."
        )


check_transformers_version()

from transformers.masking_utils import create_causal_mask  # after the check: older versions may lack it

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` in the mask functions and the model
# outputs (and in what `generate` passes to forward; our forwards take both names, through `deprecate_kwarg`).
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

try:  # transformers >= 5.21
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        """[B, S, H] -> the last `logits_to_keep` positions (0: all of them), or the positions given as a 1D tensor
        (what the models of transformers < 5.21 slice inline)."""
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]
