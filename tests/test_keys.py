"""Which class each recommended KernelConfig key hits: transformers treats Layout keys as regexes searched in
every class name of its loaded modules, so a loose key also patches other families (e.g. `*RMSNormGated`)."""
import importlib

import pytest
from transformers import monkey_patching

# families whose classes could collide by name (all that this transformers install carries are imported)
MODULES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3n", "qwen3_next",
           "qwen3_moe", "qwen2_moe", "llama4", "mixtral", "phi3", "olmo2", "qwen3_5", "mistral3"]

# README table: recommended Layout keys -> the only classes they may hit
RECOMMENDED = {
    "^LlamaMLP$": {"LlamaMLP"},
    "^MistralMLP$": {"MistralMLP"},
    "^Qwen2MLP$": {"Qwen2MLP"},
    "^Qwen3MLP$": {"Qwen3MLP"},
    "^Gemma3RMSNorm$": {"Gemma3RMSNorm"},
}


@pytest.fixture(scope="module")
def class_names():
    names = set()
    for family in MODULES:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        names |= {n for n, v in vars(module).items() if isinstance(v, type)}
    assert {"LlamaMLP", "Gemma3RMSNorm", "Qwen3RMSNorm"} <= names
    return names


def hits(key, names):
    marker = type("Marker", (), {})
    return {n for n in names if monkey_patching._find_replacement_class(n, {key: marker}) is marker}


@pytest.mark.parametrize("key", sorted(RECOMMENDED))
def test_recommended_key_hits_only_its_class(class_names, key):
    assert hits(key, class_names) == RECOMMENDED[key]


def test_unanchored_keys_hit_other_classes(class_names):
    """Why the keys are anchored: the bare names catch classes with other signatures and semantics."""
    loose = hits("RMSNorm", class_names)
    assert "Gemma3RMSNorm" in loose and "Qwen3RMSNorm" in loose
    if "Qwen3NextRMSNormGated" in class_names:
        assert "Qwen3NextRMSNormGated" in loose
    assert len(hits("MLP", class_names)) > 4


def test_gemma3_key_does_not_hit_gemma3n(class_names):
    assert "Gemma3nRMSNorm" not in hits("^Gemma3RMSNorm$", class_names | {"Gemma3nRMSNorm"})
