"""open_clip's own text tower and tokenizer as test references, imported without open_clip's package __init__.

open_clip_torch is installed for its BPE file; its __init__ imports torchvision (for the vision towers) and its
tokenizer imports ftfy (text repair), neither installed here. The text tower and the tokenizer need neither: the
one torchvision name open_clip.utils imports is a vision-only BatchNorm, and `ftfy.fix_text` is replaced by the
identity (it changes nothing in the plain-ASCII prompts the tests use). Returns None where open_clip is missing.
"""
import importlib.util
import os
import sys
import types

import torch


def open_clip_modules():
    """(open_clip.transformer, open_clip.tokenizer), or None. The stubs and the bare package live in sys.modules
    only while these two modules are imported: afterwards `find_spec("open_clip")` (tests/conftest.py) and
    transformers' checks for torchvision see the installation as it is."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    before = set(sys.modules)
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "ftfy")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    stubs["ftfy"].fix_text = lambda s: s
    sys.modules.update({"open_clip": pkg, **{n: m for n, m in stubs.items() if n not in sys.modules}})
    try:
        import open_clip.tokenizer as tokenizer
        import open_clip.transformer as transformer
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("open_clip", "torchvision", "ftfy"):
                del sys.modules[name]
    _MODULES = (transformer, tokenizer)
    return _MODULES


_MODULES = None


def sd2_text_states(tower, ids: torch.Tensor) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder(layer="penultimate") of Stability-AI/stablediffusion: token + positional embedding,
    every residual block but the last under the causal mask, then ln_final."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)
