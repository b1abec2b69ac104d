"""Converters: native MoE import/export (`native`) and dense -> MoE upcycling (`upcycle`), on the checkpoint layouts
of `layout`, through `safetensors_io`; `verify` checks their results and `hf_moe.cards` describes them.

Importing this package hands `hf_moe.cards` what a card says that only the converters know (`cards.Converters`).
"""

import math
from dataclasses import fields
from pathlib import Path

from .. import cards
from .layout import EXPORT_FORMATS, IMPORT_FORMATS, OUR_CONFIG_CLASSES, native_config_to_ours, parameter_counts
from .safetensors_io import CheckpointReader, read_config_dict
from .upcycle import UpcycleOptions, recorded_deviations, upcycle

__all__ = ["upcycle"]


def _checkpoint(folder: Path) -> cards.Checkpoint:
    """The weights of `folder` in our terms: our config for ours and the native MoE formats, with its parameter
    counts; for any other model, the parameters its weight files hold."""
    config_dict = read_config_dict(folder)
    model_type = config_dict.get("model_type")
    if model_type in OUR_CONFIG_CLASSES:
        config = OUR_CONFIG_CLASSES[model_type].from_dict(config_dict)
    elif model_type in IMPORT_FORMATS:
        config = native_config_to_ours(config_dict)
    else:
        with CheckpointReader(folder) as reader:
            total = sum(math.prod(reader.shape(name)) for name in reader.keys())
        return cards.Checkpoint(config_dict, None, total, total)
    return cards.Checkpoint(config_dict, config, *parameter_counts(config))


cards.use_converters(cards.Converters(
    checkpoint=_checkpoint, importable=EXPORT_FORMATS,
    upcycle_defaults={option.name: option.default for option in fields(UpcycleOptions)},
    upcycle_deviations=recorded_deviations,
))
