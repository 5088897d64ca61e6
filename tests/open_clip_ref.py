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
    """(open_clip.transformer, open_clip.tokenizer), or None."""
    loaded = sys.modules.get("open_clip")
    if loaded is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or spec.origin is None:
            return None
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["open_clip"] = pkg
    stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "ftfy")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    stubs["ftfy"].fix_text = lambda s: s
    for name, mod in stubs.items():
        sys.modules.setdefault(name, mod)
    import open_clip.tokenizer as tokenizer
    import open_clip.transformer as transformer

    return transformer, tokenizer


def sd2_text_states(tower, ids: torch.Tensor) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder(layer="penultimate") of Stability-AI/stablediffusion: token + positional embedding,
    every residual block but the last under the causal mask, then ln_final."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)
