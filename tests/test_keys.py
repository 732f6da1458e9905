"""The recommended KernelConfig keys (recommended_mapping): the README's table states them, and each regex key hits
only its class (transformers treats Layout keys as regexes searched in every class name of its loaded modules, so
a loose key also patches other families, e.g. `*RMSNormGated`)."""
import ast
import importlib
import re

import pytest
from transformers import monkey_patching

from devtools.build import ROOT
from devtools.checkpoints import ALL_FAMILIES

# families whose classes could collide by name (all that this transformers install carries are imported)
MODULES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3n", "qwen3_next",
           "qwen3_moe", "qwen2_moe", "llama4", "mixtral", "phi3", "olmo2", "qwen3_5", "mistral3"]


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


def recommended(ck, family: str, **options) -> dict:
    """recommended_mapping(family, "<repo>") with both MLP options in one mapping (Gemma3: fused only)."""
    mapping = {}
    for mlp in ("fused", "merged"):
        if not (family == "gemma3" and mlp == "merged"):
            mapping.update(ck.recommended_mapping(family, "<repo>", mlp=mlp, **options))
    return mapping


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_recommended_keys_hit_only_their_class(ck, class_names, family):
    """Each regex key of the recommended mapping (anchored: `^<Class>$`) hits exactly its class."""
    mapping = {**recommended(ck, family), **ck.recommended_mapping(family, "<repo>", decoder=True, qkv=True)}
    keys = [k for k in mapping if isinstance(k, str) and k.startswith("^")]
    assert any(k.endswith("DecoderLayer$") for k in keys) and any(k.endswith("Attention$") for k in keys)
    assert keys
    for key in keys:
        assert hits(key, class_names) == {key.strip("^$")}, key


def readme_table() -> dict[str, dict[str, set]]:
    """README's "Recommended KernelConfig keys per family" table: {family: {column: {(key, layer)}}}, columns
    "norm", "mlp", "rope", "decoder", "attention" by their headers. A cell lists its pairs as backticked Python
    (`KEY: "<repo>:Layer"`, or `KEY` → `Layer`); "the `Layer` tuple" repeats that layer's key from an earlier row;
    "same" repeats the cell above."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Recommended KernelConfig keys"):]
    lines = []
    for line in section.splitlines()[1:]:
        if line.lstrip().startswith("|"):
            lines.append(line)
        elif lines:
            break
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    columns = ("family", "norm", "mlp", "rope", "decoder", "attention")
    header = [next((name for name in columns if name in c.lower()), None) for c in cells[0]]
    assert set(columns) <= set(header), cells[0]
    table, key_of_layer = {}, {}
    previous = {}
    for row in cells[1:]:
        if all(set(c) <= set("-: ") for c in row):
            continue  # the separator line
        family = re.match(r"\W*([A-Za-z]+\d*)", row[header.index("family")]).group(1).lower()
        table[family] = {}
        for column, cell in zip(header, row):
            if column in (None, "family"):
                continue
            pairs, key = set(), None
            for span in re.findall(r"`([^`]+)`", cell):
                try:
                    value = ast.literal_eval("{" + span + "}")
                except (ValueError, SyntaxError):
                    value = None
                if isinstance(value, dict):
                    pairs |= {(k, v.split(":")[-1]) for k, v in value.items()}
                elif re.fullmatch(r"[A-Za-z]\w*", span):  # a layer name: after `KEY` →, or "the `Layer` tuple"
                    pairs.add((key if key is not None else key_of_layer[span], span))
                    key = None
                else:
                    key = ast.literal_eval(span)
            if not pairs and "same" in cell.lower():
                pairs = previous[column]
            key_of_layer.update({layer: k for k, layer in pairs})
            table[family][column] = previous[column] = pairs
    return table


def test_readme_table_is_recommended_mapping(ck):
    """The README's table and recommended_mapping agree, column by column, for every family."""
    table = readme_table()
    assert set(table) == set(ALL_FAMILIES)
    for family, columns in table.items():
        want = {"norm": ck.recommended_mapping(family, "<repo>", mlp=None, rope=False),
                "mlp": recommended(ck, family, norm=False, rope=False),
                "rope": ck.recommended_mapping(family, "<repo>", norm=False, mlp=None),
                "decoder": ck.recommended_mapping(family, "<repo>", norm=False, mlp=None, rope=False, decoder=True),
                "attention": ck.recommended_mapping(family, "<repo>", norm=False, mlp=None, rope=False, qkv=True)}
        for column, pairs in columns.items():
            assert pairs == {(k, v.removeprefix("<repo>:")) for k, v in want[column].items()}, (family, column)


def test_unanchored_keys_hit_other_classes(class_names):
    """Why the keys are anchored: the bare names catch classes with other signatures and semantics."""
    loose = hits("RMSNorm", class_names)
    assert "Gemma3RMSNorm" in loose and "Qwen3RMSNorm" in loose
    if "Qwen3NextRMSNormGated" in class_names:
        assert "Qwen3NextRMSNormGated" in loose
    assert len(hits("MLP", class_names)) > 4


def test_gemma3_key_does_not_hit_gemma3n(class_names):
    assert "Gemma3nRMSNorm" not in hits("^Gemma3RMSNorm$", class_names | {"Gemma3nRMSNorm"})
