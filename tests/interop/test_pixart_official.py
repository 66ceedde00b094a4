"""Official PixArt-α checkpoints -> engine PixArt, checked against diffusers on the same weights.

The official-layout checkpoint is built here from a random diffusers model with a key map written
independently of engine.interop, following the correspondences of diffusers'
scripts/convert_pixart_alpha_to_diffusers.py (read in the official -> diffusers direction).
"""

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import save_file

from engine.config import preset
from engine.interop import pixart_official
from engine.model.pixart import PixArt

TEXT_LEN, CAPTION_CHANNELS, HEADS = 7, 32, 4


def randomize_(module: torch.nn.Module) -> None:
    """Every parameter random, the zero-initialised ones included, so no term hides behind a zero."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.normal_(0.0, fan_in**-0.5)


def tiny_diffusers(micro: bool, interpolation_scale: float) -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=24, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, cross_attention_dim=96,
                                     caption_channels=CAPTION_CHANNELS, use_additional_conditions=micro,
                                     interpolation_scale=interpolation_scale)
    randomize_(model)
    return model.double().eval()


def official_layout(model: PixArtTransformer2DModel) -> dict:
    """diffusers -> official names; q/k/v and k/v re-fused in that row order, as the official code stores them."""
    d = model.state_dict()
    out = {"pos_embed": model.pos_embed.pos_embed.clone(),  # (1, N, D), the table the official model stores
           "y_embedder.y_embedding": torch.randn(TEXT_LEN, CAPTION_CHANNELS, dtype=torch.float64),
           "final_layer.scale_shift_table": d["scale_shift_table"]}
    renames = {"pos_embed.proj": "x_embedder.proj", "proj_out": "final_layer.linear",
               "caption_projection.linear_1": "y_embedder.y_proj.fc1",
               "caption_projection.linear_2": "y_embedder.y_proj.fc2",
               "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
               "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
               "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
               "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
               "adaln_single.linear": "t_block.1"}
    for i in range(len(model.transformer_blocks)):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        renames |= {src + "attn1.to_out.0": dst + "attn.proj", src + "attn2.to_q": dst + "cross_attn.q_linear",
                    src + "attn2.to_out.0": dst + "cross_attn.proj", src + "ff.net.0.proj": dst + "mlp.fc1",
                    src + "ff.net.2": dst + "mlp.fc2"}
        out[dst + "scale_shift_table"] = d[src + "scale_shift_table"]
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = torch.cat([d[f"{src}attn1.to_{n}.{suffix}"] for n in "qkv"])
            out[f"{dst}cross_attn.kv_linear.{suffix}"] = torch.cat([d[f"{src}attn2.to_{n}.{suffix}"] for n in "kv"])
    for src, dst in renames.items():
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in d:
                out[f"{dst}.{suffix}"] = d[f"{src}.{suffix}"]
    return out


def random_inputs(B, H, W, micro):
    inputs = dict(x=torch.randn(B, 4, H, W, dtype=torch.float64), t=torch.tensor([3, 999, 500])[:B],
                  caption=torch.randn(B, TEXT_LEN, CAPTION_CHANNELS, dtype=torch.float64),
                  caption_lens=torch.tensor([TEXT_LEN, 1, 4])[:B])
    if micro:
        inputs["resolution"] = torch.rand(B, 2, dtype=torch.float64) * 1024
        inputs["aspect_ratio"] = torch.rand(B, 1, dtype=torch.float64) * 2
    return inputs


def assert_same_forward(model, reference, micro):
    for H, W in [(8, 8), (8, 16)]:
        inputs = random_inputs(3, H, W, micro)
        mask = torch.arange(TEXT_LEN)[None] < inputs["caption_lens"][:, None]
        added = {k: inputs[k] for k in ("resolution", "aspect_ratio") if k in inputs}
        with torch.no_grad():
            expected = reference(inputs["x"], encoder_hidden_states=inputs["caption"], timestep=inputs["t"],
                                 encoder_attention_mask=mask, added_cond_kwargs=added, return_dict=False)[0]
            out = model(**inputs)
        assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-10, (H, W)


@pytest.mark.parametrize("micro, scale", [(False, 1.0), (True, 0.5)])
def test_load_matches_diffusers(tmp_path, micro, scale):
    reference = tiny_diffusers(micro, scale)
    official = official_layout(reference)
    torch.save({"state_dict": official}, tmp_path / "model.pth")
    model = pixart_official.load(tmp_path / "model.pth", num_heads=HEADS)
    # inferred from the tensors: grid from pos_embed's length, interpolation from its values
    assert model.config == preset("tiny-ms" if micro else "tiny", input_size=8, caption_channels=CAPTION_CHANNELS,
                                  text_len=TEXT_LEN, pe_interpolation=scale)
    assert model.patch_embed.weight.dtype == torch.float64
    assert torch.equal(model.null_caption, official["y_embedder.y_embedding"])
    assert_same_forward(model, reference, micro)


def test_training_checkpoint_ema_prefix_and_safetensors(tmp_path):
    reference = tiny_diffusers(micro=False, interpolation_scale=1.0)
    ema = official_layout(reference)
    raw = {k: v + 1.0 for k, v in ema.items()}
    module = {f"module.{k}": v for k, v in ema.items()}  # as saved from a DistributedDataParallel wrapper
    torch.save({"state_dict": raw, "state_dict_ema": module, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 3}, tmp_path / "epoch_3.pth")
    assert_same_forward(pixart_official.load(tmp_path / "epoch_3.pth", use_ema=True, num_heads=HEADS), reference, False)
    plain = pixart_official.load(tmp_path / "epoch_3.pth", num_heads=HEADS)
    assert torch.equal(plain.time_modulation.bias, raw["t_block.1.bias"])

    save_file({k: v.contiguous() for k, v in ema.items()}, tmp_path / "model.safetensors")
    assert_same_forward(pixart_official.load(tmp_path / "model.safetensors", num_heads=HEADS), reference, False)

    with pytest.raises(ValueError, match="state_dict_ema"):
        pixart_official.load(tmp_path / "model.safetensors", use_ema=True, num_heads=HEADS)


@pytest.mark.parametrize("name", ["tiny", "tiny-ms"])
def test_save_load_round_trip(tmp_path, name):
    model = PixArt(preset(name, caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN))
    randomize_(model)
    for path in (tmp_path / "model.pth", tmp_path / "model.safetensors"):
        pixart_official.save(model, path)
        back = pixart_official.load(path, num_heads=model.config.num_heads)
        assert back.config == model.config  # pe_interpolation 0.5 read back from the saved pos_embed
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_bad_checkpoints_name_the_problem(tmp_path):
    official = official_layout(tiny_diffusers(micro=False, interpolation_scale=1.0))
    config = preset("tiny", input_size=8, caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN, pe_interpolation=1.0)

    missing = {k: v for k, v in official.items() if k != "blocks.1.cross_attn.kv_linear.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.cross_attn\.kv_linear\.weight'\]"):
        pixart_official.load(tmp_path / "missing.pth", config)

    wrong = dict(official, **{"blocks.0.mlp.fc2.bias": torch.zeros(95, dtype=torch.float64)})
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc2\.bias: \(95,\) \(expected \(96,\)\)"):
        pixart_official.load(tmp_path / "wrong.pth", config)

    grid = dict(official, pos_embed=torch.zeros(1, 64, 96, dtype=torch.float64))  # a 16-latent grid, config says 8
    torch.save({"state_dict": grid}, tmp_path / "grid.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        pixart_official.load(tmp_path / "grid.pth", config)

    extra = dict(official, **{"blocks.2.attn.qkv.weight": torch.zeros(288, 96, dtype=torch.float64)})
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.qkv\.weight"):
        pixart_official.load(tmp_path / "extra.pth", config)

    no_pos = {k: v for k, v in official.items() if k != "pos_embed"}
    torch.save({"state_dict": no_pos}, tmp_path / "no_pos.pth")
    with pytest.raises(ValueError, match="input_size"):
        pixart_official.load(tmp_path / "no_pos.pth", num_heads=HEADS)
    assert pixart_official.load(tmp_path / "no_pos.pth", num_heads=HEADS, input_size=8,
                                pe_interpolation=1.0).config == config

    with pytest.raises(ValueError, match="num_heads"):  # width 96 is no published model's
        pixart_official.load(tmp_path / "no_pos.pth", input_size=8)

    absent = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(FileNotFoundError, match=str(absent)):
        pixart_official.load(absent)
