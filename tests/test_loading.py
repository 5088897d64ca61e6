"""Loading public checkpoint layouts: diffusers folders, CompVis single files, EMA, dtypes, bad files.

The CompVis key mapping is checked against diffusers' own converters (`convert_ldm_*_checkpoint`), and
the real files' key/shape lists (tests/fixtures, produced from the original code) must load completely.
"""
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from models.checkpoint import (CheckpointError, load_module, read_tensors, split_prefix, unet_from_compvis,
                               vae_from_compvis, vae_from_diffusers)
from models.clip import CLIPTextModel
from models.presets import PRESETS
from models.unet import UNet
from models.vae import AutoencoderKL
from p2p.files.loading import split_single_file
from p2p.core.pipeline import Pipeline
from tests.tiny import (compvis_unet_vae, decode_err, fixture_keys, load_single_file_on_meta, meta, reference_pipeline,
                        reference_unet, reference_vae, save_folder, sd_betas, unet_err)

TINY = PRESETS["tiny"]


def to_compvis(ref) -> dict:
    """A CompVis single file of a diffusers SD v1 pipeline (UNet and VAE by our inverted tables, checked against
    diffusers below; the text encoder as transformers names it, under cond_stage_model.transformer.)."""
    sd = compvis_unet_vae(ref.unet, ref.vae, TINY)
    for k, v in ref.text_encoder.state_dict().items():
        sd["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    sd["betas"] = sd_betas()
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ref(clip_vocab_dir):
    return reference_pipeline(clip_vocab_dir)


@pytest.fixture(scope="module")
def single_file(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_file(to_compvis(ref), str(path))
    return path


def test_compvis_file_is_what_diffusers_converts(ref, single_file):
    """diffusers' converters turn our CompVis file back into the reference weights, tensor for tensor."""
    sd = load_file(str(single_file))
    unet = convert_ldm_unet_checkpoint(sd, dict(ref.unet.config))
    assert unet.keys() == ref.unet.state_dict().keys()
    assert all(torch.equal(unet[k], v) for k, v in ref.unet.state_dict().items())
    vae = convert_ldm_vae_checkpoint(sd, dict(ref.vae.config))
    assert vae.keys() == ref.vae.state_dict().keys()
    assert all(torch.equal(vae[k].reshape(v.shape), v) for k, v in ref.vae.state_dict().items())


def test_single_file_loads_and_matches(ref, single_file, clip_vocab_dir):
    pipe = Pipeline.from_pretrained(single_file, tokenizer=clip_vocab_dir, config="tiny", device="cpu")
    assert unet_err(pipe, ref) <= 1e-4
    assert decode_err(pipe, ref, torch.randn(1, 4, 8, 8)) <= 1e-4
    with torch.no_grad():
        ids = pipe.tokenizer.encode(["a cat"])
        assert (pipe.text_encoder(ids) - ref.text_encoder(ids).last_hidden_state).abs().max() <= 1e-4


def test_single_file_needs_a_tokenizer(single_file):
    with pytest.raises(ValueError, match="carries no tokenizer.*--tokenizer"):
        Pipeline.from_pretrained(single_file, config="tiny", device="cpu")


def test_full_ema_file_takes_the_ema_weights(ref, single_file, clip_vocab_dir, tmp_path):
    sd = load_file(str(single_file))
    ema = {"model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", ""): v.clone()
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    for k in sd:  # the non-EMA copy differs: only the EMA copy reproduces the reference
        if k.startswith("model.diffusion_model."):
            sd[k] = sd[k] * 1.1
    path = tmp_path / "full-ema.safetensors"
    save_file({**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)},
              str(path))
    assert unet_err(Pipeline.from_pretrained(path, tokenizer=clip_vocab_dir, config="tiny", device="cpu"), ref) <= 1e-4
    assert unet_err(Pipeline.from_pretrained(path, tokenizer=clip_vocab_dir, config="tiny", device="cpu",
                                             ema=False), ref) > 1e-2


def test_diffusers_folder_old_vae_names_and_fp16_variant(ref, tmp_path):
    save_folder(ref, tmp_path)
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = load_file(str(vae_file))
    renamed = {}
    for k, v in sd.items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(vae_file))
    # an fp16 variant whose values differ: loading variant="fp16" must take it
    unet_file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: (v * 0.5).half() for k, v in load_file(str(unet_file)).items()}
    save_file(half, str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))

    pipe = Pipeline.from_pretrained(tmp_path, device="cpu")
    assert unet_err(pipe, ref) <= 1e-4
    assert decode_err(pipe, ref, torch.randn(1, 4, 8, 8)) <= 1e-4
    fp16 = Pipeline.from_pretrained(tmp_path, device="cpu", variant="fp16", dtype="float32")
    assert fp16.dtype == torch.float32
    assert torch.equal(fp16.unet.conv_in.weight, half["conv_in.weight"].float())
    assert Pipeline.from_pretrained(tmp_path, device="cpu", dtype="bfloat16").unet.conv_in.weight.dtype == torch.bfloat16


# --- the real files' layouts (fixtures from the original code) --------------------------------------

def test_real_sd_v1_single_file_is_consumed_completely():
    keys = fixture_keys("sd_v1_single_file_keys.json")
    assert len(keys) == 1145
    load_single_file_on_meta(keys, PRESETS["sd-v1"], CLIPTextModel)


def test_real_sd_v1_diffusers_folder_is_consumed_completely():
    keys = fixture_keys("sd_v1_diffusers_keys.json")
    cfg = PRESETS["sd-v1"]
    with torch.device("meta"):
        load_module(UNet(cfg.unet), meta(keys["unet"]), "UNet")
        for vae_keys in (keys["vae"], keys["vae_new_names"]):
            load_module(AutoencoderKL(cfg.vae), vae_from_diffusers(meta(vae_keys)), "VAE")
        load_module(CLIPTextModel(cfg.text), split_prefix(meta(keys["text_encoder"]), "text_model."), "text encoder")


def test_our_compvis_mapping_equals_diffusers_on_the_real_layout():
    """Every one of the 686 + 248 real CompVis keys goes where diffusers' converters put it."""
    keys = fixture_keys("sd_v1_single_file_keys.json")
    tagged = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}  # a tensor that names its key
    ours = {"unet": unet_from_compvis(split_prefix(tagged, "model.diffusion_model."), PRESETS["sd-v1"].unet),
            "vae": vae_from_compvis(split_prefix(tagged, "first_stage_model."), 4)}
    with torch.device("meta"):
        unet_cfg, vae_cfg = dict(reference_unet(PRESETS["sd-v1"].unet).config), dict(reference_vae(PRESETS["sd-v1"].vae).config)
    theirs_unet = convert_ldm_unet_checkpoint(tagged, unet_cfg)
    assert {k: v.item() for k, v in ours["unet"].items()} == {k: v.item() for k, v in theirs_unet.items()}
    theirs_vae = convert_ldm_vae_checkpoint(tagged, vae_cfg)
    assert {k: v.item() for k, v in ours["vae"].items()} == {k: v.item() for k, v in theirs_vae.items()}


# --- bad input --------------------------------------------------------------------------------------

def sd_like(**changes):
    keys = fixture_keys("sd_v1_single_file_keys.json")
    keys.update(changes)
    return meta({k: v for k, v in keys.items() if v is not None})


CROSS_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("changes,message", [
    ({CROSS_K: [320, 1024]}, "Stable Diffusion 2.x checkpoint but is being read with a 'sd-v1' config"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768]}, "SDXL checkpoint"),
    ({CONV_IN: [320, 9, 3, 3]}, "9 input channels .*inpainting"),
    ({"lora_unet_down.weight": [4, 4]}, "1 entries that belong to no Stable Diffusion v1 network: lora_unet_down.weight"),
])
def test_foreign_checkpoints_are_named(changes, message):
    with pytest.raises(CheckpointError, match=message):
        split_single_file(sd_like(**changes), PRESETS["sd-v1"])


def test_missing_and_misshaped_keys_are_listed():
    sd = sd_like(**{"model.diffusion_model.out.2.bias": None, "model.diffusion_model.out.0.weight": [321]})
    sds = split_single_file(sd, PRESETS["sd-v1"])
    with torch.device("meta"), pytest.raises(CheckpointError) as e:
        load_module(UNet(PRESETS["sd-v1"].unet), sds["unet"], "UNet")
    msg = str(e.value)
    assert "1 missing: conv_out.bias" in msg and "conv_norm_out.weight (file [321], model [320])" in msg


def test_not_a_stable_diffusion_file():
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 checkpoint.*first keys: a.weight"):
        split_single_file({"a.weight": torch.zeros(1)}, PRESETS["sd-v1"])
    with pytest.raises(CheckpointError, match="single diffusers UNet file; pass the whole diffusers folder"):
        split_single_file({"conv_in.weight": torch.zeros(1)}, PRESETS["sd-v1"])


def test_truncated_safetensors(single_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*p2p download"):
        read_tensors(cut)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refuse to unpickle"):
        read_tensors(path)
    assert "pwned" not in capsys.readouterr().out


def test_plain_pickle_of_tensors_is_read(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"x": torch.ones(2)}, "global_step": 5}, path)
    assert torch.equal(read_tensors(path)["x"], torch.ones(2))


def test_folder_errors(ref, tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers Stable Diffusion v1 folder: missing text_encoder/"):
        (tmp_path / "unet").mkdir(), (tmp_path / "vae").mkdir()
        Pipeline.from_pretrained(tmp_path, device="cpu")
    save_folder(ref, tmp_path / "sd")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*unet: expected one of diffusion_pytorch_model.safetensors"):
        Pipeline.from_pretrained(tmp_path / "sd", device="cpu")
    (tmp_path / "sd" / "vae" / "config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Pipeline.from_pretrained(tmp_path / "sd", device="cpu")
