"""--init from every accepted format gives the same model as from the engine checkpoint it was
written from: a facebookresearch/DiT .pt (re-parameterised), an official PixArt-α .pth, a
diffusers transformer folder; and a file of another kind is a clear error."""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.interop import dit as dit_format
from engine.interop import pixart_official
from engine.model import build_model
from tests.model.helpers import randomize
from tests.train.conftest import TEXT_WIDTH, run_in_process
from train.checkpoint import load_init


def _pixart():
    return build_model(preset("tiny", 16, input_size=16, in_channels=3, caption_channels=TEXT_WIDTH,
                              pe_interpolation=1.0))


def _save_engine_run(model, tmp_path, kind: str):
    """An engine checkpoint of ``model`` (raw = EMA) written by the training code's own save."""
    import dataclasses

    from train.checkpoint import save_checkpoint
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {"config": {}, "model": {"class": type(model.config).__name__, "config": dataclasses.asdict(model.config)}}
    save_checkpoint(tmp_path / kind, 1, state, state, {}, {}, info, keep=1)
    return tmp_path / kind


def _init(path, seed: int = 7):
    torch.manual_seed(seed)
    model = _pixart()
    load_init(model, path)
    return model


def _assert_equal(a: dict, b: dict, skip=()):
    assert a.keys() == b.keys()
    for key in a:
        if key not in skip:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_dit_checkpoint_is_reparameterised_like_an_engine_stage1_run(tmp_path):
    dit = randomize(build_model(preset("tiny-dit", 16, input_size=16, in_channels=3)))
    engine_run = _save_engine_run(dit, tmp_path, "stage1")
    dit_format.save(dit, tmp_path / "DiT-tiny.pt")
    from_pt, from_run = _init(tmp_path / "DiT-tiny.pt").double(), _init(engine_run).double()
    # the weights the DiT provides are copied exactly; the rest is fresh, so compare what the models
    # compute where re-parameterisation pins them: t = 500, null class, any caption
    copied = [k for k in dit.state_dict() if k in from_pt.state_dict()]
    assert "blocks.1.attn.qkv.weight" in copied and "final.linear.weight" in copied
    for key in copied:
        torch.testing.assert_close(from_pt.state_dict()[key], dit.state_dict()[key].double(), rtol=0, atol=0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.full((2,), 500.0, dtype=torch.float64)
    caption, lens = torch.randn(2, 8, TEXT_WIDTH, dtype=torch.float64), torch.tensor([8, 3])
    null = torch.full((2,), dit.null_class)
    with torch.no_grad():  # tolerance: the modulation tables are stored in fp32
        expected = dit.double()(x, t, null)
        torch.testing.assert_close(from_pt(x, t, caption, lens), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_run(x, t, caption, lens), expected, rtol=1e-5, atol=1e-6)
        assert (from_pt(x, t - 300, caption, lens) - dit(x, t - 300, null)).abs().max() > 1e-2


def test_official_and_diffusers_pixart(tmp_path):
    pixart = randomize(_pixart())
    expected = pixart.state_dict()
    pixart_official.save(pixart, tmp_path / "PixArt-tiny.pth")
    _assert_equal(_init(tmp_path / "PixArt-tiny.pth").state_dict(), expected)
    engine_run = _save_engine_run(pixart, tmp_path, "stage2")
    _assert_equal(_init(engine_run).state_dict(), expected)
    assert run_in_process("export", "--ckpt", engine_run, "--to", "diffusers", tmp_path / "diffusers") == 0
    # diffusers has no learned null caption: the initialised model keeps its own
    _assert_equal(_init(tmp_path / "diffusers").state_dict(), expected, skip=("null_caption",))


def test_unknown_init_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a facebookresearch/DiT checkpoint"):
        load_init(_pixart(), path)
    with pytest.raises(ValueError, match=r"holds a PixArt \(official-format\); a class-conditional DiT starts from a DiT"):
        pixart_official.save(_pixart(), tmp_path / "p.pth")
        load_init(build_model(preset("tiny-dit", 16, input_size=16, in_channels=3)), tmp_path / "p.pth")


def test_init_file_whose_pickle_is_not_utf8(tmp_path):
    """A pickle naming a global in bytes that are not UTF-8 makes torch.load raise UnicodeDecodeError
    (a ValueError whose constructor takes five arguments): --init reports it as a ValueError naming
    the file, as it does any other unreadable file."""
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"c\xea\nx\n")
    with pytest.raises(UnicodeDecodeError):
        torch.load(garbage, map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match=f"--init {garbage}: ") as caught:
        load_init(_pixart(), garbage)
    assert type(caught.value) is ValueError
