"""Captioning throughput of `python -m train caption`: images/s of a LLaVA-1.5-7B-shaped model
with random weights, the batch size chosen by measurement, and the projection to PixArt-α's
10M SAM images in GPU-hours.

    python bench/caption.py [--shape llava-1.5-7b|tiny] [--batches 8,16,32,64,128,192]
                            [--max-new-tokens 160] [--image-size 1500x2250] [--timed 3] [--end-to-end 4]
                            [--workers 8] [--json PATH]

The model is built from its configuration (no weights, tokenizer or processor is downloaded):
LLaVA-1.5-7B's shape as llava-hf/llava-1.5-7b-hf configures it, a CLIP ViT-L/14 at 336 px (576
image tokens, features from the second-to-last layer) and a Llama-2-7B-shaped language model
(32 layers, 4096 wide, vocabulary 32064), in bf16 on the GPU. The tokenizer is a word-level one
over placeholder tokens of the same vocabulary size, and the processor is LLaVA's
(CLIP preprocessing at 336 px). Random weights rarely emit the end token, so generation is held
to exactly ``--max-new-tokens`` tokens per image (``min_new_tokens``): every figure is for
captions of that length (160 by default, `caption`'s default, a little over the 120 T5 tokens
`prepare` keeps).

Two measurements:

1. sweep: for each batch size, ``--timed`` generation batches (after one untimed warm-up) on
   inputs already prepared by the processor; the median batch time gives generation images/s.
   The fastest batch size is chosen; an out-of-memory batch ends the sweep.
2. end to end at the chosen batch: the `caption` command's own loop (engine.data.captioning:
   JPEG decoding on ``--workers`` threads, the processor on another, generation, the journal
   fsynced every batch) over ``--end-to-end`` batches of synthetic JPEGs of ``--image-size``
   (the released SAM images have a shorter side of 1500 px). Its images/s is the figure projected:
   10M images / (images/s) / 3600 = GPU-hours on this GPU, one process per GPU.

On a CPU the default shape is ``tiny`` (a 2-layer model): a smoke test of the script, not a
measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Run as a script, this folder is first on sys.path, where its kernels.py would shadow the
# installed `kernels` package that transformers imports: move it behind the installed packages.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
import hardware  # noqa: E402
from engine.data import captioning  # noqa: E402
from engine.data.sources import open_source  # noqa: E402
from engine.data.vlm import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT, Captioner, inspect_vlm  # noqa: E402

SAM_IMAGES = 10_000_000  # PixArt-α stage 2: SAM's images captioned by LLaVA (arXiv 2310.00426, §2.4)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Words of the tiny model's vocabulary: its random captions are made of them, so they can be
# counted by the density report and read by `prepare`.
TINY_WORDS = ("a an the of in on with and is are image photo painting style detailed bright dark warm "
              "red blue green yellow white black cat dog tree house sky road car person table chair window "
              "flower river mountain cloud light shadow water grass street building wall door Describe this "
              "its very manner").split()
# A LLaVA-1.5-style conversation (one user turn with the image first, then the assistant's reply).
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
                 "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
                 "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _shape(name: str, vocab_size: int) -> dict:
    """Vision tower, language model and projector settings of a named shape."""
    if name == "llava-1.5-7b":  # llava-hf/llava-1.5-7b-hf config.json
        return dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
                    text=dict(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                              rms_norm_eps=1e-5),
                    vision_feature_layer=-2)
    if name == "tiny":
        return dict(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8, projection_dim=16),
                    text=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512),
                    vision_feature_layer=-1)
    raise ValueError(f"unknown shape {name!r}; choose llava-1.5-7b or tiny")


def _vocabulary(name: str) -> list[str]:
    if name == "llava-1.5-7b":  # 32064 entries, as the real model's embedding table
        return SPECIAL_TOKENS + [f"t{i}" for i in range(32064 - len(SPECIAL_TOKENS))]
    return SPECIAL_TOKENS + list(TINY_WORDS)


def random_llava(path: str | Path, shape: str = "tiny", *, save_weights: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Write a LLaVA model folder of ``shape`` to ``path`` (config, processor, and with
    ``save_weights`` the random weights); return the model (built on ``device`` in ``dtype``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = _vocabulary(shape)
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)          # "<image>" stays one token
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    spec = _shape(shape, len(words))
    side = spec["vision"]["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=fast, patch_size=spec["vision"]["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                         text_config=LlamaConfig(**spec["text"], pad_token_id=words.index("<pad>"),
                                                 bos_token_id=words.index("<s>"), eos_token_id=words.index("</s>")),
                         image_token_index=words.index("<image>"), projector_hidden_act="gelu",
                         vision_feature_layer=spec["vision_feature_layer"], vision_feature_select_strategy="default",
                         image_seq_length=(side // spec["vision"]["patch_size"]) ** 2)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    Path(path).mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(path)
    if save_weights:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
    return model


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth random picture (a coarse noise field, upscaled) as a JPEG, so it compresses and
    decodes like a photograph rather than like white noise."""
    coarse = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep(captioner: Captioner, images: list, batches: list[int], timed: int) -> list[dict]:
    """Generation images/s per batch size, inputs prepared beforehand; stops at out of memory."""
    rows = []
    for batch in batches:
        inputs = captioner.inputs([images[i % len(images)] for i in range(batch)])
        row = {"batch": batch, "img_per_s": None, "batch_seconds": None, "error": None}
        try:
            seconds = []
            for repeat in range(timed + 1):  # the first batch warms up (kernels, allocator)
                _synchronize(captioner.device)
                start = time.perf_counter()
                captioner.generate(inputs, f"sweep{repeat}")
                _synchronize(captioner.device)
                if repeat:
                    seconds.append(time.perf_counter() - start)
            row["batch_seconds"] = statistics.median(seconds)
            row["img_per_s"] = batch / row["batch_seconds"]
        except torch.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if row["error"]:
            torch.cuda.empty_cache()
            break
    return rows


def end_to_end(captioner: Captioner, batch: int, batches: int, image_size: tuple[int, int], workers: int,
               folder: Path) -> dict:
    """The `caption` loop over ``batch * batches`` synthetic JPEGs: images/s as the command runs."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(batch * batches):
        (images / f"{i:06d}.jpg").write_bytes(_jpeg(rng, *image_size))
    source = open_source(images)
    journal = captioning.Journal(folder / "journal.jsonl")

    class _NoBar:
        def update(self, n):
            pass

    _synchronize(captioner.device)
    start = time.perf_counter()
    captioned, skipped = captioning.caption_items(source.items, captioner, journal, batch_size=batch,
                                                   workers=workers, bar=_NoBar(), after_batch=None)
    _synchronize(captioner.device)
    seconds = time.perf_counter() - start
    journal.close()
    return {"batch": batch, "images": captioned, "skipped": skipped, "seconds": seconds,
            "img_per_s": captioned / seconds, "image_size": list(image_size), "workers": workers}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--shape", default="llava-1.5-7b" if cuda else "tiny", choices=["llava-1.5-7b", "tiny"])
    parser.add_argument("--batches", default="8,16,32,64,128,192" if cuda else "2,4",
                        help="batch sizes to sweep, comma-separated, ascending")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--image-size", default="1500x2250" if cuda else "64x96", help="HEIGHTxWIDTH of the JPEGs")
    parser.add_argument("--timed", type=int, default=3, help="timed generation batches per sweep row")
    parser.add_argument("--end-to-end", type=int, default=4, help="batches of the end-to-end run (0: skip it)")
    parser.add_argument("--workers", type=int, default=8 if cuda else 1, help="decoding threads of the end-to-end run")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--git-commit", default=None,
                        help="commit to record (default: read from the repository; the GPU machine has no .git)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    height, width = (int(v) for v in args.image_size.split("x"))
    batch_sizes = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_llava(tmp / "vlm", args.shape, save_weights=False, device=device, dtype=dtype)
        captioner = Captioner(inspect_vlm(tmp / "vlm"), device=device, dtype=dtype, prompt=DEFAULT_PROMPT,
                              max_new_tokens=args.max_new_tokens, model=model)
        captioner.generation_config.min_new_tokens = args.max_new_tokens  # every caption at full length
        rng = np.random.default_rng(1)
        images = [Image.open(io.BytesIO(_jpeg(rng, height, width))).convert("RGB") for _ in range(8)]
        prompt_tokens = int(captioner.inputs(images[:1])["input_ids"].shape[1])
        rows = sweep(captioner, images, batch_sizes, args.timed)
        measured = [row for row in rows if row["img_per_s"]]
        best = max(measured, key=lambda row: row["img_per_s"]) if measured else None
        e2e = None
        if best and args.end_to_end > 0:
            e2e = end_to_end(captioner, best["batch"], args.end_to_end, (height, width), args.workers, tmp / "e2e")
            print(json.dumps(e2e), file=sys.stderr)
    rate = e2e["img_per_s"] if e2e else (best["img_per_s"] if best else None)
    result = {
        "what": "captioning images/s, bench/caption.py",
        "shape": args.shape,
        "representative": cuda and args.shape == "llava-1.5-7b",
        "note": ("LLaVA-1.5-7B shape, random weights, bf16; captions held to max_new_tokens" if cuda
                 else "CPU smoke run of the script: NOT representative of any GPU"),
        "dtype": str(dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "prompt": DEFAULT_PROMPT,
        "prompt_tokens": prompt_tokens,  # image tokens included
        "sweep": rows,
        "best_batch": best["batch"] if best else None,
        "end_to_end": e2e,
        "projection": None if rate is None else {
            "images": SAM_IMAGES, "img_per_s": rate, "from": "end_to_end" if e2e else "sweep",
            "gpu_hours": SAM_IMAGES / rate / 3600,
            "note": "one process per GPU; GPU-hours = images / (img/s) / 3600; PixArt-α stage 2's 10M SAM images"},
        "environment": hardware.environment([sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
                                            git_commit=args.git_commit),
    }
    if result["projection"]:
        print(f"{args.shape}: best batch {result['best_batch']}, {rate:.2f} img/s -> "
              f"{result['projection']['gpu_hours']:.0f} GPU-hours for {SAM_IMAGES / 1e6:.0f}M images", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
