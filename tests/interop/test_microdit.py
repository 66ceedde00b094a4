"""Official MicroDiT checkpoints <-> engine MicroDiT: key layout, config inference, round trips.

The official-layout state dict comes from engine.interop.microdit.save; that its keys and
tensors mean what the official DiT means by them is checked in tests/model/test_microdit.py,
which runs a transcription of the official forward on it.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import family
from engine.config import MicroDiTConfig, preset
from engine.interop import microdit as interop
from engine.model import MicroDiT
from tests.model.helpers import randomize

# what the tensors cannot tell about the tiny preset (its head dim and rounding multiple differ
# from MicroDiT_XL_2's defaults; text_len is no tensor's size)
TINY_UNSEEN = dict(head_dim=32, multiple_of=32, text_len=8)


def tiny_model(resolution=64, **fields) -> MicroDiT:
    return randomize(MicroDiT(preset("microdit-tiny", resolution, **fields)))


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fields", [dict(), dict(mixer_dim=128, experts_every=1, num_experts=3), dict(resolution=128)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_save_round_trip(fields, suffix, tmp_path):
    model = tiny_model(**fields)
    interop.save(model, tmp_path / f"dit{suffix}")
    first = interop.to_official(model)
    loaded = interop.load(tmp_path / f"dit{suffix}", **TINY_UNSEEN)
    assert loaded.config == model.config  # the position scale too: 0.25 at 64 px, 0.5 at 128
    interop.save(loaded, tmp_path / f"again{suffix}")
    again = interop.read_checkpoint(tmp_path / f"again{suffix}")
    assert_same_state(first, again)
    assert_same_state(model.state_dict(), loaded.state_dict())


def test_xl2_layout_and_inference():
    """The official MicroDiT_XL_2 key names and shapes, and the config read back from them."""
    with torch.device("meta"):
        model = MicroDiT(preset("microdit-xl2"))
    sd = interop.to_official(model)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "x_embedder.proj.weight": (1024, 4, 2, 2), "pos_embed": (1, 256, 1024), "mask_token": (1, 1, 16),
        "t_embedder.mlp.0.weight": (1024, 512), "y_embedder.y_proj.fc1.weight": (1024, 1024),
        "y_embedder.y_proj.norm.weight": (1024,), "y_emb_preprocess.attn.qkv.weight": (3072, 1024),
        "y_emb_preprocess.mlp.w1.weight": (2816, 1024), "pooled_y_emb_process.fc2.bias": (1024,),
        "patch_mixer_map_xin.1.weight": (768, 1024), "patch_mixer_map_y.0.weight": (1024,),
        "patch_mixer_map_xout.1.weight": (1024, 768), "patch_mixer.0.mlp.w1.weight": (2048, 768),
        "patch_mixer.1.mlp.w1": (8, 768, 3072), "patch_mixer.1.mlp.gate.weight": (8, 768),
        "patch_mixer.5.adaLN_modulation.1.weight": (4608, 1024), "patch_mixer.2.cross_attn.kv_linear.weight":
        (1536, 768), "blocks.0.attn.qkv.weight": (1536, 1024), "blocks.0.attn.proj.weight": (1024, 512),
        "blocks.0.cross_attn.q_linear.weight": (1024, 1024), "blocks.1.mlp.w2": (8, 768, 1024),
        "blocks.27.mlp.w3.weight": (1024, 2816), "blocks.27.adaLN_modulation.1.bias": (6144,),
        "final_layer.norm_final.weight": (1024,), "final_layer.adaLN_modulation.1.weight": (2048, 1024),
        "final_layer.linear.weight": (16, 1024),
    }
    assert {k: shapes[k] for k in expected} == expected
    unbiased = ("blocks.", "patch_mixer", "y_emb_preprocess.")  # only adaLN keeps a bias there
    assert all("adaLN_modulation" in k for k in sd if k.endswith(".bias") and k.startswith(unbiased))
    assert not any("ln_q" in k or "ln_k" in k or "norm1.bias" in k for k in sd)  # no affine / no bias
    assert sum(v.numel() for k, v in sd.items() if k not in ("pos_embed", "mask_token")) == 1_165_442_320
    assert interop.infer_config(sd) == MicroDiTConfig()  # every default is MicroDiT_XL_2's


def test_sizes_off_the_rule_are_listed(tmp_path):
    model = tiny_model(attn_widths=(64, 64, 96, 128), ffn_widths=(64, 160, 96, 64))
    interop.save(model, tmp_path / "dit.pt")
    loaded = interop.load(tmp_path / "dit.pt", **TINY_UNSEEN)
    assert loaded.config.attn_widths == (64, 64, 96, 128) and loaded.config.ffn_widths == (64, 160, 96, 64)
    assert_same_state(model.state_dict(), loaded.state_dict())


def test_latent_diffusion_state_dict(tmp_path):
    """The whole latent-diffusion model's state dict: its "dit." part is read."""
    model = tiny_model()
    weights = {f"dit.{k}": v for k, v in interop.to_official(model).items()}
    weights["vae.decoder.conv_in.weight"] = torch.zeros(3)
    torch.save(weights, tmp_path / "model.pt")
    assert_same_state(model.state_dict(), interop.load(tmp_path / "model.pt", **TINY_UNSEEN).state_dict())


def test_errors(tmp_path):
    model = tiny_model()
    interop.save(model, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="pos_embed is not the sin-cos table .* pe_interpolation = 1"):
        interop.load(tmp_path / "dit.pt", pe_interpolation=1.0, **TINY_UNSEEN)
    with pytest.raises(ValueError, match="mixer_dim=96 is not divisible by head_dim=64"):
        interop.load(tmp_path / "dit.pt")
    weights = interop.to_official(model)
    weights["mask_token"] += 1
    torch.save(weights, tmp_path / "token.pt")
    with pytest.raises(ValueError, match="mask_token is not zero"):
        interop.load(tmp_path / "token.pt", **TINY_UNSEEN)
    weights = interop.to_official(model)
    del weights["blocks.2.cross_attn.q_linear.weight"]
    weights["blocks.2.cross_attn.q_linear.bias"] = torch.zeros(128)
    torch.save(weights, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.2.cross_attn.q_linear.weight'\]; unexpected keys "
                                         r"\['blocks.2.cross_attn.q_linear.bias'\]"):
        interop.load(tmp_path / "broken.pt", **TINY_UNSEEN)
    with pytest.raises(ValueError, match="pass either config or config fields"):
        interop.load(tmp_path / "dit.pt", config=model.config, head_dim=32)


def test_family_init_and_export(tmp_path):
    """A 256 px model initialised from a 64 px official file: every parameter copied; and the
    family's export writes the official file."""
    fam = family.get("microdit")
    source = tiny_model()
    fam.export(source, "official", tmp_path / "export")
    target = fam.build(fam.make_config("microdit-tiny", 256, {}))
    how = fam.init(target, Path(tmp_path / "export" / "dit.pt"), None)
    assert how == "official MicroDiT weights copied"
    assert_same_state(source.state_dict(), target.state_dict())
    other = fam.build(dataclasses.replace(target.config, depth=3))
    with pytest.raises(ValueError, match="does not fit the model"):
        fam.init(other, source, None)
