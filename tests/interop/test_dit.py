"""facebookresearch/DiT checkpoints -> engine DiT, checked against diffusers' DiTTransformer2DModel.

How diffusers' DiT conditions (models/embeddings.py CombinedTimestepLabelEmbeddings): every block
owns a copy of the timestep embedder and label table (the conversion script copies DiT's single
ones into each), the final layer reuses block 0's. Its sinusoid spaces frequencies by
1 / (half - 1) (Timesteps(downscale_freq_shift=1)) where facebookresearch/DiT's
timestep_embedding uses 1 / half; the reference below sets the shift to 0 so diffusers computes
DiT's own features. Its pre-MLP LayerNorm takes ``norm_eps`` (default 1e-5); DiT's are all 1e-6,
so the reference is built with norm_eps=1e-6. The DiT-layout checkpoint is built here with a key
map written independently of engine.interop.
"""

import argparse

import pytest
import torch
from diffusers import DiTTransformer2DModel

from engine.config import preset
from engine.interop import dit as dit_interop
from engine.model.dit import DiT

NUM_CLASSES, HEADS = 10, 4


def randomize_(module: torch.nn.Module) -> None:
    """Every parameter random, the zero-initialised ones included, so no term hides behind a zero."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.normal_(0.0, fan_in**-0.5)


def tiny_diffusers_dit() -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=24, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6)
    randomize_(model)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(shared.state_dict())  # one embedder, as in a converted DiT
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # facebookresearch/DiT's frequency spacing
    return model.double().eval()


def dit_layout(model: DiTTransformer2DModel) -> dict:
    d = model.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": model.pos_embed.pos_embed.clone(),
           "y_embedder.embedding_table.weight": d[emb + "class_embedder.embedding_table.weight"]}
    renames = {"pos_embed.proj": "x_embedder.proj", emb + "timestep_embedder.linear_1": "t_embedder.mlp.0",
               emb + "timestep_embedder.linear_2": "t_embedder.mlp.2",
               "proj_out_1": "final_layer.adaLN_modulation.1", "proj_out_2": "final_layer.linear"}
    for i in range(len(model.transformer_blocks)):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        renames |= {src + "norm1.linear": dst + "adaLN_modulation.1", src + "attn1.to_out.0": dst + "attn.proj",
                    src + "ff.net.0.proj": dst + "mlp.fc1", src + "ff.net.2": dst + "mlp.fc2"}
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = torch.cat([d[f"{src}attn1.to_{n}.{suffix}"] for n in "qkv"])
    for src, dst in renames.items():
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = d[f"{src}.{suffix}"]
    return out


def assert_same_forward(model, reference):
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 999, 250, 500])
    labels = torch.tensor([NUM_CLASSES, 0, 7, NUM_CLASSES])  # the null class included
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=labels, return_dict=False)[0]
        out = model(x, t, labels)
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_released_state_dict_matches_diffusers(tmp_path):
    reference = tiny_diffusers_dit()
    torch.save(dit_layout(reference), tmp_path / "DiT-tiny.pt")
    model = dit_interop.load(tmp_path / "DiT-tiny.pt", num_heads=HEADS)
    assert model.config == preset("tiny-dit", input_size=8)
    assert_same_forward(model, reference)


def test_training_checkpoint(tmp_path):
    reference = tiny_diffusers_dit()
    ema = dit_layout(reference)
    raw = {k: v - 1.0 for k, v in ema.items()}
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args},
               tmp_path / "0050000.pt")
    assert_same_forward(dit_interop.load(tmp_path / "0050000.pt", num_heads=HEADS), reference)  # EMA by default
    trained = dit_interop.load(tmp_path / "0050000.pt", use_ema=False, num_heads=HEADS)
    assert torch.equal(trained.label_embed.weight, raw["y_embedder.embedding_table.weight"])

    torch.save({"model": raw}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="'ema'"):
        dit_interop.load(tmp_path / "no_ema.pt", num_heads=HEADS)


def test_save_load_round_trip(tmp_path):
    model = DiT(preset("tiny-dit"))
    randomize_(model)
    for path in (tmp_path / "model.pt", tmp_path / "model.safetensors"):
        dit_interop.save(model, path)
        back = dit_interop.load(path, num_heads=model.config.num_heads)
        assert back.config == model.config
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_bad_checkpoints_name_the_problem(tmp_path):
    weights = dit_layout(tiny_diffusers_dit())
    config = preset("tiny-dit")

    torch.save({k: v for k, v in weights.items() if k != "blocks.0.adaLN_modulation.1.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.adaLN_modulation\.1\.bias"):
        dit_interop.load(tmp_path / "missing.pt", config)

    wrong = dict(weights, **{"y_embedder.embedding_table.weight": torch.zeros(1001, 96, dtype=torch.float64)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight: \(1001, 96\)"):
        dit_interop.load(tmp_path / "wrong.pt", config)

    with pytest.raises(ValueError, match="num_heads"):
        dit_interop.load(tmp_path / "wrong.pt")

    absent = tmp_path / "DiT-XL-2-256x256.pt"
    with pytest.raises(FileNotFoundError, match=str(absent)):
        dit_interop.load(absent)
