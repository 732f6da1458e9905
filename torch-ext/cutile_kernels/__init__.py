"""cuTile kernels for transformers LLMs, loaded through the Kernel Hub (`kernels`)."""
from . import layers
from ._runtime import CutileFallbackWarning
from .adapters import convert_lora_adapter
from .configs import recommended_mapping
from .cross_entropy import (causal_lm_loss, cross_entropy, cross_entropy_backward_cutile,
                            cross_entropy_backward_reference, cross_entropy_cutile, cross_entropy_reference)
from .gated_act import (gated_act, gated_act_backward_cutile, gated_act_backward_reference, gated_act_cutile,
                        gated_act_reference)
from .isolation import transformers_state_guard
from .parallel import keep_tp_grad_hooks
from .rms_norm import (add_rms_norm, add_rms_norm_cutile, add_rms_norm_reference, gemma_rms_norm,
                       gemma_rms_norm_reference, rms_norm, rms_norm_add, rms_norm_add_cutile, rms_norm_add_reference,
                       rms_norm_backward_cutile, rms_norm_backward_reference,
                       rms_norm_cutile, rms_norm_reference, sandwich_rms_norm, sandwich_rms_norm_backward_cutile,
                       sandwich_rms_norm_backward_reference, sandwich_rms_norm_cutile, sandwich_rms_norm_reference)
from .rope import (apply_rotary_pos_emb, qk_norm_rope, qk_norm_rope_cutile, qk_norm_rope_reference,
                   rope_backward_cutile, rope_backward_reference, rope_cutile, rope_reference)
from .training import enable_training

__all__ = ["layers", "CutileFallbackWarning", "add_rms_norm", "add_rms_norm_cutile", "add_rms_norm_reference",
           "apply_rotary_pos_emb", "causal_lm_loss", "cross_entropy",
           "cross_entropy_backward_cutile", "cross_entropy_backward_reference", "cross_entropy_cutile",
           "cross_entropy_reference", "convert_lora_adapter", "enable_training", "gated_act",
           "gated_act_backward_cutile", "gated_act_backward_reference", "gated_act_cutile", "gated_act_reference",
           "gemma_rms_norm",
           "keep_tp_grad_hooks", "qk_norm_rope", "qk_norm_rope_cutile", "qk_norm_rope_reference",
           "gemma_rms_norm_reference", "rms_norm", "rms_norm_add", "rms_norm_add_cutile", "rms_norm_add_reference",
           "rms_norm_backward_cutile", "rms_norm_backward_reference",
           "rms_norm_cutile", "rms_norm_reference", "recommended_mapping", "rope_backward_cutile",
           "rope_backward_reference", "rope_cutile", "rope_reference",
           "sandwich_rms_norm", "sandwich_rms_norm_backward_cutile", "sandwich_rms_norm_backward_reference",
           "sandwich_rms_norm_cutile", "sandwich_rms_norm_reference", "transformers_state_guard"]
