import subprocess
import sys

from gaprune import options
from gaprune.layers import LAYER_PATTERNS


def test_options_import_no_torch():
    code = "import sys, gaprune.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_layer_types_are_the_pattern_names():
    for patterns in LAYER_PATTERNS.values():
        assert tuple(patterns) == options.LAYER_TYPES


def test_score_dtypes_are_torch_dtypes():
    import torch
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in options.SCORE_DTYPES)
