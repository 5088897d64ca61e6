"""SDXL base 1.0 against diffusers / transformers: the two tokenizers, the text conditioning (CLIP-L || bigG
penultimate states, bigG's pooled vector, zeros for an empty negative prompt), loading a diffusers folder and a
seeded generation equal to StableDiffusionXLPipeline with an SD-configured DDIMScheduler (tiny config, real
CLIP vocabulary, random weights)."""
import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer as RefTokenizer

from models.errors import UserError
from models.presets import PRESETS, preset
from models.sdxl import SDXLTokenizer
from p2p.core.pipeline import Pipeline
from tests.tiny import reference_xl_pipeline

TINY = PRESETS["tiny-sdxl"]
PROMPTS = ["a photograph of an astronaut riding a horse", "a cat sitting on a chair", ""]


@pytest.fixture(scope="module")
def folder(clip_vocab_dir, tmp_path_factory):
    ref = reference_xl_pipeline(clip_vocab_dir)
    path = tmp_path_factory.mktemp("tiny_sdxl")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder[1], device="cpu")


# --- tokenizers --------------------------------------------------------------------------------------------

def test_both_tokenizers_equal_transformers(clip_vocab_dir):
    """Tokenizer 1 pads with <|endoftext|>; tokenizer 2 with "!" = 0, and reads a typed "!" as 0, as the hub's."""
    ours = SDXLTokenizer.from_path(clip_vocab_dir)
    files = str(clip_vocab_dir / "vocab.json"), str(clip_vocab_dir / "merges.txt")
    refs = RefTokenizer(*files), RefTokenizer(*files, pad_token="!")
    prompts = PROMPTS + ["a cat!", "wow!! a dog!!!", "a cat, sitting on a mat (watercolor)"]
    got = ours.encode_pair(prompts)
    for i, ref in enumerate(refs):
        expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(got[:, i], expected)
    assert torch.equal(got[[0, 1, 2, 3, 5], 0], ours.encode(prompts[:4] + prompts[-1:]))  # agreeing prompts
    assert (got[0, 1, 12:] == 0).all() and (got[0, 0, 12:] == 49407).all()


def test_prompt_split_differently_is_refused(clip_vocab_dir):
    ours = SDXLTokenizer.from_path(clip_vocab_dir)
    assert ours.word_token_indices("a cat! sits", "sits") == [4]  # one "!": one token in both
    with pytest.raises(UserError, match="split the prompt 'wow!! a dog' differently .*remove the '!'") as e:
        ours.word_token_indices("wow!! a dog", "dog")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mapper", ["replace_mapper", "refine_mapper"])
def test_edit_refuses_such_a_prompt(clip_vocab_dir, mapper):
    import p2p.core.align as align

    ours = SDXLTokenizer.from_path(clip_vocab_dir)
    with pytest.raises(UserError, match="differently"):
        getattr(align, mapper)(ours, "a cat!! on a mat", "a dog!! on a mat")
    with pytest.raises(UserError, match="differently"):
        getattr(align, mapper)(ours, "a cat on a mat", "a dog!! on a mat")


# --- text conditioning ----------------------------------------------------------------------------------------

def test_text_conditioning_equals_diffusers_encode_prompt(folder, pipe):
    ref, _ = folder
    with torch.no_grad():
        states, neg, pooled, neg_pooled = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=True)
    ours = pipe.encode_text(PROMPTS)
    assert ours.shape == (3, 78, 80) and states.shape == (3, 77, 80)
    assert (ours[:, :77] - states).abs().max() <= 1e-5
    assert (ours[:, 77, :16] - pooled).abs().max() <= 1e-5 and (ours[:, 77, 16:] == 0).all()
    assert states.abs().max() > 0.5 and pooled.abs().max() > 0.1
    # the empty negative prompt is zeros (force_zeros_for_empty_prompt), a non-empty one is encoded
    assert (neg == 0).all() and (neg_pooled == 0).all() and (pipe.encode_negative("") == 0).all()
    assert (pipe.encode_negative("blurry") - pipe.encode_text(["blurry"])).abs().max() == 0


def test_folder_is_read_as_sdxl(pipe):
    assert pipe.cfg.family == "sdxl" and pipe.cfg.text == TINY.text and pipe.cfg.unet == TINY.unet
    assert pipe.cfg.vae.scaling_factor == 0.13025 and pipe.cfg.image_size == 64
    assert isinstance(pipe.tokenizer, SDXLTokenizer)


def test_full_size_preset():
    cfg = preset("sdxl")
    assert (cfg.image_size, cfg.guidance, cfg.vae.scaling_factor, cfg.text.width, cfg.unet.sample_size) == \
        (1024, 5.0, 0.13025, 2048, 128)
    assert cfg.unet.projection_class_embeddings_input_dim == cfg.text.pooled_dim + 6 * cfg.unet.addition_time_embed_dim
    from models.sdxl import SDXLTextEncoder
    with torch.device("meta"):
        text = SDXLTextEncoder(cfg.text)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # sd2-sdxl.md §3.3: 123,060,480 and 694,659,840 (CLIP-L's unused final LayerNorm counted, as the file has it)
    assert (n(text.text_encoder), n(text.text_encoder_2)) == (123_060_480, 694_659_840)


# --- seeded generation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=10, guidance_scale=5.0, height=64, width=64),
    dict(num_inference_steps=6, guidance_scale=7.5, height=48, width=80),
    dict(num_inference_steps=6, guidance_scale=5.0, height=64, width=64, negative_prompt="blurry"),
])
def test_seeded_generation_equals_diffusers(folder, pipe, kw):
    ref, _ = folder
    prompt = "a photograph of an astronaut riding a horse"
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kw).images[0]
    expected = (out * 255).round()
    (got,) = pipe.generate(prompt, seed=3, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"],
                           height=kw["height"], width=kw["width"], negative_prompt=kw.get("negative_prompt", ""),
                           progress=False)
    diff = np.abs(np.asarray(got, float) - expected)
    print(f"mean abs {diff.mean():.4f}/255, max {diff.max():.0f}/255")
    assert expected.std() > 5
    assert diff.mean() <= 1.0
