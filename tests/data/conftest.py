"""Tiny random encoders saved to disk, and demo images, for the data tests (nothing downloaded)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from engine.data import demo


def jpeg_bytes(image: Image.Image) -> bytes:
    """``image`` as a JPEG file's bytes (quality 90), e.g. to truncate into an undecodable one."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def save_tiny_vae(path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(path)


def save_tiny_text_encoder(path, corpus: list[str]) -> None:
    """A 2-layer T5 encoder and a word-level tokenizer trained on ``corpus``; T5-style, the
    tokenizer appends </s> to every caption."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.get_vocab_size(), d_model=16, d_kv=4, d_ff=32, num_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    save_tiny_vae(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_encoder")
    words = [*demo.COLOURS, *demo.SHAPES, *demo.SIZES, *demo.POSITIONS, *demo.BACKGROUNDS]
    save_tiny_text_encoder(path, [" ".join(words), "a in the on and background , top left"])
    return str(path)
