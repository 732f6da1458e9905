"""cuTile kernels for transformers LLMs, loaded through the Kernel Hub (`kernels`)."""
from . import layers
from .gated_act import gated_act, gated_act_cutile, gated_act_reference
from .isolation import transformers_state_guard
from .rms_norm import (gemma_rms_norm, gemma_rms_norm_reference, rms_norm, rms_norm_cutile,
                       rms_norm_reference)

__all__ = ["layers", "gated_act", "gated_act_cutile", "gated_act_reference", "gemma_rms_norm",
           "gemma_rms_norm_reference", "rms_norm", "rms_norm_cutile", "rms_norm_reference",
           "transformers_state_guard"]
