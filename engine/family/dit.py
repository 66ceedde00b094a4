"""The class-conditional DiT family (Peebles & Xie, arXiv 2212.09748): PixArt-α's first stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from engine.config import DiTConfig
from engine.family import Family, Preset, register

_XL2 = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0)


@register
class DiTFamily(Family):
    name = "dit"
    description = "class-conditional DiT (per-block adaLN, class labels)"
    config_class = DiTConfig
    condition = "label"
    presets = {
        "tiny-dit": Preset(dict(patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4, num_classes=10),
                           64, "2 blocks of width 96, 10 classes"),
        "dit-xl2": Preset(dict(_XL2, num_classes=1000), 256, "DiT-XL/2, ImageNet's 1000 classes"),
    }

    def build(self, config: DiTConfig) -> torch.nn.Module:
        from engine.model.dit import DiT

        return DiT(config)

    def check_cache(self, config: DiTConfig, cache) -> None:
        if not cache.has_labels:
            raise ValueError(f"latent cache {cache.path} has no class labels: a class-conditional model needs a "
                             f"cache made with `prepare --labels`")
        if len(cache.classes) > config.num_classes:
            raise ValueError(f"latent cache {cache.path} has {len(cache.classes)} classes, the model "
                             f"num_classes = {config.num_classes}")

    def training_conditions(self, module, batch, generator, train) -> dict:
        import torch

        B = batch["latent"].shape[0]
        drop = torch.rand(B, generator=generator, device=generator.device) < train.label_dropout  # (B,)
        return {"labels": torch.where(drop, module.null_class, batch["label"])}

    def learns_variance(self, config: DiTConfig) -> bool:
        return config.learn_sigma

    def flops(self, module, batch, train) -> float:
        B, _, h, w = batch["latent"].shape
        return B * module.flops_per_sample(h * 8, w * 8)

    def preview_conditions(self, config: DiTConfig, cache, count: int):
        labels = [i % config.num_classes for i in range(count)]
        return labels, [f"class {label}" for label in labels]

    def sampling_conditions(self, model, count, condition, pixels_per_latent, device) -> dict:
        """``condition``: one class id per image."""
        import torch

        labels = torch.as_tensor(condition, dtype=torch.int64, device=device)  # (count,)
        if labels.min() < 0 or labels.max() >= model.config.num_classes:
            raise ValueError(f"class ids {labels.tolist()} are outside [0, {model.config.num_classes})")
        return {"labels": labels}

    def null_conditions(self, model, count) -> dict:
        from engine.diffusion import null_class_kwargs

        return null_class_kwargs(model, count)

    def init(self, module, source, objective) -> str:
        """From an engine DiT or a facebookresearch/DiT .pt: every tensor copied (position
        embeddings are computed, so a checkpoint of another resolution loads unchanged)."""
        from engine.model.dit import DiT

        fmt = "engine"
        if isinstance(source, Path):
            from engine.interop import checkpoint_keys, dit

            if not source.is_file():
                raise FileNotFoundError(f"{source} does not exist")
            keys = checkpoint_keys(source)
            if "y_embedder.y_proj.fc1.weight" in keys:
                raise ValueError("holds a PixArt (official-format); a class-conditional DiT starts from a DiT")
            if "y_embedder.embedding_table.weight" not in keys:
                raise ValueError("not a facebookresearch/DiT checkpoint (no y_embedder.embedding_table); "
                                 "a class-conditional DiT also starts from an engine DiT checkpoint or run folder")
            overrides = {"num_heads": module.config.num_heads}
            if "pos_embed" not in keys:
                overrides["input_size"] = module.config.input_size
            source, fmt = dit.load(source, **overrides), "facebookresearch/DiT"
        if not isinstance(source, DiT):
            raise ValueError(f"holds a {type(source).__name__}; a class-conditional DiT starts from a DiT")
        self.copy_weights(module, {k: v.float() for k, v in source.state_dict().items()})
        return f"{fmt} weights copied" if fmt != "engine" else "weights copied"
