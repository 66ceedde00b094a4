"""The PixArt-α family: text-to-image transformer with cross-attention and adaLN-single.

Presets follow the official PixArt-α configs (arXiv 2310.00426 and its code): PixArt-XL/2 is
DiT-XL/2's backbone (28 blocks, width 1152, 16 heads, patch 2, MLP ratio 4) with T5-XXL caption
features (4096 wide, 120 tokens); the position-embedding interpolation scale ("lewei_scale") is
1 at 256 and 512 px and 2 at 1024 px, i.e. max(1, resolution / 512).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from engine.config import PixArtConfig
from engine.family import Family, Preset, register

_XL2 = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0)
_TINY = dict(patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4, caption_channels=32, text_len=8)


def _drop_captions_hook(module, args, kwargs):
    drop = kwargs.pop("drop_caption", None)
    if drop is not None:
        caption, lens = module.drop_captions(kwargs["caption"], kwargs["caption_lens"], drop)
        kwargs.update(caption=caption, caption_lens=lens)
    return args, kwargs


def preview_captions(cache, text_len: int, count: int) -> tuple[list, list[str]]:
    """The caption features and texts of the cache's first ``count`` samples of sample 0's
    bucket (so a training grid needs no text encoder); caption-conditioned families share it."""
    import numpy as np

    same_bucket = np.flatnonzero(cache.sample_buckets == cache.sample_buckets[0])[:count]
    return cache.read(same_bucket, text_len)["text"], [cache.caption(int(i)) for i in same_bucket]


def padded_conditions(features: list, caption_channels: int, text_len: int, device) -> dict:
    """pad_captions of caption features for sampling, after checking their width against the
    model's ``caption_channels``."""
    widths = {f.shape[1] for f in features}
    if widths != {caption_channels}:
        raise ValueError(f"caption features {sorted(widths)} wide; the model takes {caption_channels} "
                         f"(caption_channels): use the text encoder the model was trained with")
    return pad_captions(features, text_len, device)


def pad_captions(features: list, text_len: int, device) -> dict:
    """Caption features (L_i, Ct) of true length -> caption (B, text_len, Ct) fp32 zero-padded + caption_lens (B,)."""
    import numpy as np
    import torch

    lens = [min(f.shape[0], text_len) for f in features]
    width = features[0].shape[1]
    caption = torch.zeros(len(features), text_len, width)  # (B, L, Ct)
    for i, (f, n) in enumerate(zip(features, lens)):
        caption[i, :n] = torch.from_numpy(np.asarray(f[:n], dtype=np.float32))
    return {"caption": caption.to(device), "caption_lens": torch.tensor(lens, dtype=torch.int64, device=device)}


@register
class PixArtFamily(Family):
    name = "pixart"
    description = "PixArt-α text-to-image transformer (cross-attention to caption features, adaLN-single)"
    config_class = PixArtConfig
    condition = "caption"
    exporters = ("diffusers",)
    presets = {
        # tests: every code path (micro-conditions included) in a model that runs in milliseconds on a CPU
        "tiny": Preset(_TINY, 64, "2 blocks of width 96, 8 caption tokens of width 32"),
        "tiny-ms": Preset(dict(_TINY, micro_conditions=True), 64, "tiny with size / aspect micro-conditions"),
        "pixart-xl2": Preset(dict(_XL2, caption_channels=4096, text_len=120), 256, "PixArt-XL/2"),
        "pixart-xl2-ms": Preset(dict(_XL2, caption_channels=4096, text_len=120, micro_conditions=True), 1024,
                                "PixArt-XL/2 with micro-conditions (multi-aspect)"),
    }

    def make_config(self, preset: str, resolution: int, overrides: dict):
        overrides = {"pe_interpolation": max(1.0, resolution / 512), **overrides}
        return super().make_config(preset, resolution, overrides)

    def build(self, config: PixArtConfig) -> torch.nn.Module:
        from engine.model.pixart import PixArt

        return PixArt(config)

    def text_len(self, config: PixArtConfig) -> int:
        return config.text_len

    def check_cache(self, config: PixArtConfig, cache) -> None:
        if cache.text_width == 0:
            raise ValueError(f"latent cache {cache.path} has no text features (built without --text-encoder); "
                             f"a text-to-image model trains on captions")
        if cache.text_width != config.caption_channels:
            raise ValueError(f"latent cache {cache.path} holds {cache.text_width}-wide caption features and the "
                             f"model takes caption_channels = {config.caption_channels}: set "
                             f"--set model.fields.caption_channels={cache.text_width} for this text encoder")

    def prepare_training(self, module: nn.Module) -> None:
        """Let the forward take ``drop_caption=`` (B,) bool and swap those captions for the learned
        null caption inside the call. Inside, because under FSDP2 the null caption is only
        unsharded during the root module's forward (its pre-forward hook runs before this one)."""
        module.register_forward_pre_hook(_drop_captions_hook, with_kwargs=True)

    def training_conditions(self, module, batch, generator, train) -> dict:
        import torch

        B = batch["latent"].shape[0]
        drop = torch.rand(B, generator=generator, device=generator.device) < train.caption_dropout  # (B,)
        kwargs = {"caption": batch["caption"].float(), "caption_lens": batch["caption_lens"], "drop_caption": drop}
        if module.config.micro_conditions:
            kwargs.update(resolution=batch["resolution"], aspect_ratio=batch["aspect_ratio"])
        return kwargs

    def learns_variance(self, config: PixArtConfig) -> bool:
        return config.learn_sigma

    def flops(self, module, batch, train) -> float:
        """Latent sides in VAE pixels (x8), as flops_per_sample expects, so pixel caches count
        their true token grid."""
        B, _, h, w = batch["latent"].shape
        return B * module.flops_per_sample(h * 8, w * 8, batch["caption"].shape[1])

    def preview_conditions(self, config: PixArtConfig, cache, count: int):
        return preview_captions(cache, config.text_len, count)

    def sampling_conditions(self, model, count, condition, pixels_per_latent, device) -> dict:
        """``condition``: a list of caption feature arrays (L_i, C), one per image."""
        import torch

        c = model.config
        kwargs = padded_conditions(condition, c.caption_channels, c.text_len, device)
        if c.micro_conditions:  # a square image of the configured size; micro-conditions in pixels
            pixels = float(c.input_size * pixels_per_latent)
            kwargs["resolution"] = torch.tensor([[pixels, pixels]] * count, device=device)  # (count, 2)
            kwargs["aspect_ratio"] = torch.ones(count, 1, device=device)  # (count, 1)
        return kwargs

    def null_conditions(self, model, count) -> dict:
        from engine.diffusion import null_caption_kwargs

        return null_caption_kwargs(model, count)

    # ---------------------------------------------------------------- init and export

    def init(self, module, source, objective) -> str:
        """From an engine PixArt (every tensor copied), an engine DiT (PixArt-α's re-parameterisation
        at the objective's midpoint timestep), or a file: a diffusers PixArtTransformer2DModel folder,
        an official PixArt-α .pth, a facebookresearch/DiT .pt. A PixArt without micro-conditions
        loaded into one with them keeps fresh size / aspect embedders whose output layers start at
        zero, so the loaded model's predictions are unchanged. A diffusers model has no learned null
        caption: the model keeps its own."""
        import torch

        from engine.model.dit import DiT
        from engine.model.pixart import PixArt

        fmt = "engine"
        if isinstance(source, Path):
            source, fmt = _read_foreign(source, module.config)
        if isinstance(source, DiT):
            from engine.interop.reparam import dit_to_pixart

            t_ref = objective.midpoint_timestep() if objective is not None else 500
            dit_to_pixart(source.float(), module.config, t_ref=t_ref, into=module)
            return f"{fmt} DiT weights re-parameterised into PixArt (engine.interop.reparam.dit_to_pixart, t = {t_ref:g})"
        if not isinstance(source, PixArt):
            raise ValueError(f"holds a {type(source).__name__}; a PixArt starts from a PixArt or a DiT")
        weights = {k: v.float() for k, v in source.state_dict().items()}
        if fmt == "diffusers":
            del weights["null_caption"]  # from_diffusers made up a random one
        fresh = self.copy_weights(module, weights, lambda key: key.startswith(("size_embed.", "aspect_embed."))
                                  or key == "null_caption")
        how = f"{fmt} weights copied" if fmt != "engine" else "weights copied"
        if any(k.startswith("size_embed.") for k in fresh):
            with torch.no_grad():
                for embedder in (module.size_embed, module.aspect_embed):
                    embedder.fc2.weight.zero_()
                    embedder.fc2.bias.zero_()
            how += "; new micro-condition embedders start with zero output"
        return how

    def export(self, model, fmt, path) -> str:
        if fmt != "diffusers":
            return super().export(model, fmt, path)
        from engine.interop.diffusers import to_diffusers

        to_diffusers(model).save_pretrained(Path(path))
        return "a diffusers PixArtTransformer2DModel"


def _read_foreign(path: Path, target: PixArtConfig):
    """(model, format name) of a PixArt or DiT in a foreign format at ``path``."""
    if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
        from diffusers import PixArtTransformer2DModel

        from engine.interop.diffusers import from_diffusers
        folder = path if (path / "config.json").is_file() else path / "transformer"
        return from_diffusers(PixArtTransformer2DModel.from_pretrained(folder)), "diffusers"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    from engine.interop import checkpoint_keys

    keys = checkpoint_keys(path)
    overrides = {"num_heads": target.num_heads}
    if "pos_embed" not in keys:
        overrides["input_size"] = target.input_size
    if "y_embedder.embedding_table.weight" in keys:
        from engine.interop import dit
        return dit.load(path, **overrides), "facebookresearch/DiT"
    if "y_embedder.y_proj.fc1.weight" in keys:
        from engine.interop import pixart_official
        return pixart_official.load(path, **overrides), "official-format PixArt-α"
    raise ValueError("not a facebookresearch/DiT checkpoint (no y_embedder.embedding_table) nor an official-format "
                     "PixArt-α one (no y_embedder.y_proj); other accepted inits: an engine checkpoint folder or run "
                     "folder, a diffusers PixArtTransformer2DModel folder")
