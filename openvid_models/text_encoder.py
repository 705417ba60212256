"""The caption encoder: T5 (DeepFloyd's t5-v1_1-xxl for the released models) from a local directory, with the
caption cleaning the OpenVid-1M / PixArt-alpha models were trained with, to 120 tokens.

``encode(captions) -> {"y": [B, 1, 120, 4096], "mask": [B, 120]}`` is what STDiT/MVDiT take; the null caption
for classifier-free guidance is the model's learned ``y_embedder.y_embedding`` (:func:`null_caption`).
"""

from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------------
# Caption cleaning (upstream's rules, in upstream's order; applied twice, as in training)
# ---------------------------------------------------------------------------------------------------------

_URL_ENDINGS = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DASHES = ("\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31"
           "\uFE32\uFE58\uFE63\uFF0D")
_BAD_PUNCTUATION = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]{1,}"
_CJK_RANGES = ["\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff",
               "\u4e00-\u9fff"]


def _steps(pairs):
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Before the HTML is stripped: urls.
_URLS = _steps([(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_ENDINGS + "))", ""),
                (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_ENDINGS + "))", "")])
# After it: handles, CJK, dashes and quotes, entities, ids, file names, runs of punctuation.
_MARKUP = _steps([
    (r"@[\w\d]+\b", ""),
    *((f"[{cjk}]+", "") for cjk in _CJK_RANGES),
    (f"[{_DASHES}]+", "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA, ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCTUATION, r" "),
    (r"\s+\.\s+", r" "),
])
_WORD_SEPARATORS = re.compile(r"(?:\-|\_)")  # this-is-my-cute-cat
# After the text is fixed: product codes, shop phrases, sizes, spacing, wrapping quotes and stray ends.
_CODES = _steps([
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
])


def _apply(steps, text: str) -> str:
    for pattern, replacement in steps:
        text = pattern.sub(replacement, text)
    return text


def _clean_once(caption: str) -> str:
    import ftfy  # noqa: PLC0415  (text fixing, only for the encoder)
    from bs4 import BeautifulSoup  # noqa: PLC0415

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _apply(_URLS, caption.replace("<person>", "person"))
    caption = _apply(_MARKUP, BeautifulSoup(caption, features="html.parser").text)
    if len(_WORD_SEPARATORS.findall(caption)) > 3:
        caption = _WORD_SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption))).strip()
    return _apply(_CODES, caption).strip()


def clean_caption(caption: str) -> str:
    """The caption as the models saw it in training: lower case, without urls, markup, handles, CJK, ids, file
    names and shop boilerplate, punctuation and spacing normalised."""
    return _clean_once(_clean_once(caption))


# ---------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------

class T5TextEncoder:
    """A T5 encoder and its tokenizer (transformers), captions padded or truncated to ``model_max_length``."""

    def __init__(self, encoder, tokenizer, model_max_length: int = 120, clean: bool = True):
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.clean = clean

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cuda", dtype=torch.bfloat16, **kwargs) -> T5TextEncoder:
        """Tokenizer and encoder weights from a local directory (never fetched from the hub)."""
        from transformers import AutoTokenizer, T5EncoderModel  # noqa: PLC0415  (only the encoder needs them)

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device)
        return cls(encoder, tokenizer, **kwargs)

    @property
    def output_dim(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"y": [B, 1, L, d_model], "mask": [B, L]}`` (L = model_max_length; mask 1 at real tokens)."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got one string")
        texts = [clean_caption(c) if self.clean else str(c).lower().strip() for c in captions]
        tokens = self.tokenizer(texts, max_length=self.model_max_length, padding="max_length", truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = tokens["attention_mask"].to(device)
        y = self.encoder(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return {"y": y[:, None], "mask": mask}


def null_caption(model, n: int) -> torch.Tensor:
    """``[n, 1, L, caption_channels]``: the model's learned null caption (classifier-free guidance), n times."""
    return model.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)
