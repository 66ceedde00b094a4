"""Shared by the model tests: random weights everywhere, so nothing hides behind zero-init."""

import torch


def randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def pixart_inputs(config, batch=3, height=None, width=None, dtype=torch.float64, lens=None):
    height = height or config.input_size
    width = width or config.input_size
    x = torch.randn(batch, config.in_channels, height, width, dtype=dtype)
    t = torch.randint(0, 1000, (batch,)).to(dtype)
    caption = torch.randn(batch, config.text_len, config.caption_channels, dtype=dtype)
    if lens is None:
        lens = torch.randint(1, config.text_len + 1, (batch,))
        lens[0] = config.text_len
    kwargs = {}
    if config.micro_conditions:
        kwargs = dict(resolution=torch.tensor([[height * 8.0, width * 8.0]] * batch, dtype=dtype),
                      aspect_ratio=torch.tensor([[height / width]] * batch, dtype=dtype))
    return x, t, caption, torch.as_tensor(lens), kwargs
