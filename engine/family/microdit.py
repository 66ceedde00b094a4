"""The MicroDiT family: a sparse DiT trained from scratch with deferred masking (arXiv 2407.15811).

``microdit-xl2`` is the official MicroDiT_XL_2 (1,165.4 M parameters). The position-embedding
interpolation scale is resolution / 256 (the official configs: 1 at 256 px, 2 at 512 px), so the
sin-cos coordinates span the same range at every resolution. Captions are dropped by zeroing
their features (the official latents loader does so), which is also the unconditional input
classifier-free guidance contrasts with. With ``train.mask_ratio`` > 0 every sample keeps
int(T (1 - mask_ratio)) of its T patch tokens after the patch-mixer, drawn from the step's
generator, and the loss counts the kept patches only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from engine.config import MicroDiTConfig
from engine.family import Family, Preset, register

# CPU tests: a mixer of another width than the backbone, MoE blocks in both, heads of 32 as MicroDiT_Tiny_2
_TINY = dict(hidden_size=128, depth=4, head_dim=32, mixer_depth=2, mixer_dim=96, num_experts=4, multiple_of=32,
             caption_channels=32, text_len=8)


@register
class MicroDiTFamily(Family):
    name = "microdit"
    description = "MicroDiT sparse text-to-image transformer (patch-mixer, deferred masking, expert-choice MoE)"
    config_class = MicroDiTConfig
    condition = "caption"
    exporters = ("official",)
    presets = {
        "microdit-tiny": Preset(_TINY, 64, "4 blocks of width 128, a 2-block mixer of width 96, 4 experts"),
        "microdit-xl2": Preset({}, 256, "MicroDiT_XL_2: 28 blocks of width 1024, 6-block mixer of width 768, "
                                        "8 experts"),
    }

    def make_config(self, preset: str, resolution: int, overrides: dict):
        overrides = {"pe_interpolation": resolution / 256, **overrides}
        return super().make_config(preset, resolution, overrides)

    def build(self, config: MicroDiTConfig) -> torch.nn.Module:
        from engine.model.microdit import MicroDiT

        return MicroDiT(config)

    def describe(self, config: MicroDiTConfig) -> str:
        return (f"MicroDiT ({config.depth} blocks of width {config.hidden_size}, mixer {config.mixer_depth} x "
                f"{config.mixer_dim}, {config.num_experts} experts)")

    def text_len(self, config: MicroDiTConfig) -> int:
        return config.text_len

    def check_cache(self, config: MicroDiTConfig, cache) -> None:
        """Caption features as wide as caption_channels, at most text_len tokens each (the model
        has no padding mask: a longer caption would be cut, a shorter one is zero-padded)."""
        if cache.text_width == 0:
            raise ValueError(f"latent cache {cache.path} has no text features (built without --text-encoder); "
                             f"a text-to-image model trains on captions")
        if cache.text_width != config.caption_channels:
            raise ValueError(f"latent cache {cache.path} holds {cache.text_width}-wide caption features and the "
                             f"model takes caption_channels = {config.caption_channels}: set "
                             f"--set model.fields.caption_channels={cache.text_width} for this text encoder")
        if cache.max_tokens > config.text_len:
            raise ValueError(f"latent cache {cache.path} keeps up to max_tokens = {cache.max_tokens} caption tokens "
                             f"and the model reads text_len = {config.text_len}: prepare the cache with "
                             f"--max-tokens {config.text_len}, or set model.fields.text_len={cache.max_tokens}")

    def training_conditions(self, module, batch, generator, train) -> dict:
        """Draws, in order: the caption drop (B,), then with train.mask_ratio > 0 the masking noise
        (B, T) whose ascending order gives each sample's kept tokens, the first int(T (1 - r)) as
        the official masking takes them. ``loss_mask`` (B, T) is 1 on the kept patches."""
        import torch

        latent = batch["latent"]
        B, _, h, w = latent.shape
        drop = torch.rand(B, generator=generator, device=generator.device) < train.caption_dropout  # (B,)
        caption = batch["caption"].float()  # (B, L, Ct)
        kwargs = {"caption": torch.where(drop.to(caption.device)[:, None, None], 0.0, caption)}
        ratio = train.mask_ratio
        if ratio > 0:
            p = module.config.patch_size
            T = (h // p) * (w // p)
            K = int(T * (1 - ratio))
            if K < 1:
                raise ValueError(f"train.mask_ratio = {ratio} keeps no patch of the {T} of a {h}x{w} latent")
            noise = torch.rand(B, T, generator=generator, device=generator.device)  # (B, T)
            keep = noise.argsort(dim=1, stable=True)[:, :K].to(latent.device)  # (B, K)
            loss_mask = torch.zeros(B, T, device=latent.device).scatter_(1, keep, 1.0)  # (B, T)
            kwargs.update(keep=keep, loss_mask=loss_mask)
        return kwargs

    def flops(self, module, batch, train) -> float:
        """Latent sides in VAE pixels (x8), as flops_per_sample expects; ``train`` (the run's train
        section) gives the mask ratio, none counts the unmasked model."""
        B, _, h, w = batch["latent"].shape
        return B * module.flops_per_sample(h * 8, w * 8, train.mask_ratio)

    def preview_conditions(self, config: MicroDiTConfig, cache, count: int):
        from engine.family.pixart import preview_captions

        return preview_captions(cache, config.text_len, count)

    def sampling_conditions(self, model, count, condition, pixels_per_latent, device) -> dict:
        """``condition``: a list of caption feature arrays (L_i, C), zero-padded to text_len."""
        from engine.family.pixart import padded_conditions

        c = model.config
        return {"caption": padded_conditions(condition, c.caption_channels, c.text_len, device)["caption"]}

    def null_conditions(self, model, count) -> dict:
        import torch

        c = model.config
        device = next(model.parameters()).device
        return {"caption": torch.zeros(count, c.text_len, c.caption_channels, device=device)}

    # ---------------------------------------------------------------- init and export

    def init(self, module, source, objective) -> str:
        """From an engine MicroDiT or an official MicroDiT checkpoint (the DiT module's state dict):
        every tensor copied; the positions are computed for this model's resolution."""
        from engine.model.microdit import MicroDiT

        fmt = "engine"
        if isinstance(source, Path):
            from engine.interop import microdit

            c = module.config
            # what the tensors cannot tell comes from this model's config
            source = microdit.load(source, head_dim=c.head_dim, expert_capacity=c.expert_capacity, text_len=c.text_len,
                                   multiple_of=c.multiple_of, mixer_ffn_ratio=c.mixer_ffn_ratio)
            fmt = "official MicroDiT"
        if not isinstance(source, MicroDiT):
            raise ValueError(f"holds a {type(source).__name__}; a MicroDiT starts from a MicroDiT")
        self.copy_weights(module, {k: v.float() for k, v in source.state_dict().items()})
        return f"{fmt} weights copied" if fmt != "engine" else "weights copied"

    def export(self, model, fmt, path) -> str:
        if fmt != "official":
            return super().export(model, fmt, path)
        from engine.interop import microdit

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        microdit.save(model, path / "dit.pt")
        return "the official MicroDiT DiT state dict (dit.pt)"
