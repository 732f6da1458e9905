"""cuTile kernels for transformers LLMs, loaded through the Kernel Hub (`kernels`)."""
from . import layers
from .autograd import gated_act_autograd, rms_norm_autograd, rope_autograd
from .gated_act import gated_act, gated_act_cutile, gated_act_reference
from .isolation import transformers_state_guard
from .rms_norm import (gemma_rms_norm, gemma_rms_norm_reference, rms_norm, rms_norm_cutile,
                       rms_norm_reference)
from .rope import apply_rotary_pos_emb, rope_cutile, rope_reference

__all__ = ["layers", "apply_rotary_pos_emb", "gated_act", "gated_act_autograd", "gated_act_cutile",
           "gated_act_reference", "rms_norm_autograd",
           "gemma_rms_norm", "gemma_rms_norm_reference", "rms_norm", "rms_norm_cutile", "rms_norm_reference",
           "rope_autograd", "rope_cutile", "rope_reference", "transformers_state_guard"]
