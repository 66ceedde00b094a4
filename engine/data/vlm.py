"""A vision-language model that writes captions: any transformers image-text-to-text model saved
in a local folder (``AutoModelForImageTextToText`` + ``AutoProcessor``: LLaVA, LLaVA-NeXT,
Qwen2-VL, ...). Nothing is downloaded: the folder must hold the weights, the config and the
processor (image processor, tokenizer and chat template).

``inspect_vlm`` checks a folder without loading weights, so `caption` can refuse a wrong path
before it reads an image; ``Captioner`` loads the weights and captions batches of images.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.encode import fingerprint

# PixArt-α (arXiv 2310.00426, §2.4) had LLaVA caption SAM with this prompt.
DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner"
# PixArt-α's text encoder keeps 120 T5 tokens (`prepare --max-tokens 120`); a few more new tokens
# than that let the caption end on a sentence rather than be cut by the generation limit.
DEFAULT_MAX_NEW_TOKENS = 160


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding, or sampling reproducible from ``seed`` (per batch: see Captioner.generate)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass
class VlmFolder:
    """What ``inspect_vlm`` found: the folder's identity and its processor (weights not loaded)."""

    path: str
    identity: dict   # {"path", "fingerprint", "model_type", "class"}
    processor: object


def inspect_vlm(path: str | os.PathLike) -> VlmFolder:
    """Check that ``path`` is a local image-text-to-text model with a processor and a chat template.

    Raises ValueError (or FileNotFoundError) naming the path and what is wrong; reads configs and
    tokenizer files only.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--vlm {root} does not exist (a local model folder is needed; nothing is downloaded)")
    if not root.is_dir():
        raise NotADirectoryError(f"--vlm {root} is not a folder (pass the folder save_pretrained wrote)")
    if not (root / "config.json").is_file():
        raise ValueError(f"--vlm {root} has no config.json: not a transformers model folder")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as error:  # noqa: BLE001 -- any failure here means the folder's config is unusable
        raise ValueError(f"--vlm {root}: its config.json cannot be read by transformers: {error}") from error
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"--vlm {root} holds a {config.model_type!r} model, not an image-text-to-text model "
                         f"(AutoModelForImageTextToText has no class for it); caption needs a vision-language "
                         f"model such as LLaVA or Qwen2-VL")
    try:
        processor = AutoProcessor.from_pretrained(root, local_files_only=True)
    except Exception as error:  # noqa: BLE001 -- missing or broken processor files
        raise ValueError(f"--vlm {root}: no usable processor ({type(error).__name__}: {error}); save the model's "
                         f"AutoProcessor (image processor + tokenizer) into the same folder") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(f"--vlm {root}: the processor found is a {type(processor).__name__}, without an image "
                         f"processor and a tokenizer; save the model's AutoProcessor into the same folder")
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise ValueError(f"--vlm {root}: the processor has no chat template, so the prompt cannot be placed "
                         f"around the image; save a processor with its chat template")
    architectures = getattr(config, "architectures", None) or [None]
    identity = {"path": str(root.resolve()), "fingerprint": fingerprint(root), "model_type": config.model_type,
                "class": architectures[0]}
    return VlmFolder(str(root), identity, processor)


def batch_seed(seed: int, first_key: str) -> int:
    """The RNG seed of a sampled batch: from the run's seed and the batch's first item."""
    digest = hashlib.sha256(f"{seed}\0{first_key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Captioner:
    """Batched caption generation: ``inputs`` (CPU: the processor) then ``generate`` (the device).

    The two halves are separate so that a caller can prepare the next batch on a CPU thread
    while the model generates the current one.
    """

    def __init__(self, folder: VlmFolder, *, device: str | torch.device, dtype: torch.dtype,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 sampling: Sampling = Sampling(), model: torch.nn.Module | None = None):
        """``model``: an already-built model used instead of the folder's weights (bench/caption.py
        builds random 7B weights on the GPU rather than writing and reading 14 GB)."""
        from transformers import AutoModelForImageTextToText

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.sampling = sampling
        self.processor = folder.processor
        self.processor.tokenizer.padding_side = "left"  # prompts end where generation starts
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not encode and decode at once
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if model is None:
            model = AutoModelForImageTextToText.from_pretrained(folder.path, dtype=dtype, local_files_only=True)
        self.model = model.to(self.device, dtype).eval()
        self.generation_config = self._generation_config(max_new_tokens)

    def _generation_config(self, max_new_tokens: int):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.num_beams = 1
        config.do_sample = self.sampling.do_sample
        # the model's own sampling defaults (some ship temperature / top_k) are replaced, not mixed in
        config.top_k = None
        config.temperature = self.sampling.temperature if self.sampling.do_sample else None
        config.top_p = self.sampling.top_p if self.sampling.do_sample else None
        tokenizer = self.processor.tokenizer
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        return config

    def inputs(self, images: list) -> dict:
        """The processor's tensors for a batch of RGB PIL images (on the CPU)."""
        with self._tokenizer_lock:
            return self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)

    @torch.inference_mode()
    def generate(self, inputs: dict, first_key: str = "") -> list[str]:
        """Captions for a batch from ``inputs``; sampled batches are seeded by ``batch_seed``."""
        batch = {key: value.to(self.device, non_blocking=True) for key, value in inputs.items()}
        for key, value in batch.items():
            if value.is_floating_point():
                batch[key] = value.to(self.dtype)  # pixel values in the model's precision
        if self.sampling.do_sample:
            torch.manual_seed(batch_seed(self.sampling.seed, first_key))
        out = self.model.generate(**batch, generation_config=self.generation_config)  # (B, prompt + new)
        new = out[:, batch["input_ids"].shape[1]:]                                       # (B, new)
        with self._tokenizer_lock:
            texts = self.processor.batch_decode(new.cpu(), skip_special_tokens=True)
        return [text.strip() for text in texts]
