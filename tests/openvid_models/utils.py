"""Helpers shared by the model tests: the released checkpoints' names and shapes, tiny models and inputs, and
plain-PyTorch pieces for restating the upstream forward passes."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import openvid_models as om

# Every tensor name and shape of the released OpenVid-1M checkpoints (copied from the project's reference facts).
CHECKPOINT_KEYS = json.loads((Path(__file__).parent / "checkpoint_keys.json").read_text())


def released_shape_mismatches(model_class, size: str, checkpoint: str) -> dict:
    """Names missing on either side and shapes that differ, for the full-size model built on the meta device."""
    with torch.device("meta"):
        model = model_class(**om.MODEL_SIZES[size])
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    released = CHECKPOINT_KEYS[checkpoint]
    return dict(missing=sorted(set(released) - set(ours)), unexpected=sorted(set(ours) - set(released)),
                shapes={name: (shape, released[name]) for name, shape in ours.items()
                        if name in released and released[name] != shape})


def tiny_model(model_class, seed=0, **overrides):
    """The tiny size of a model class, in eval mode, with every weight perturbed: upstream zero-initialises the
    output layers, and random weights make every path count."""
    torch.manual_seed(seed)
    model = model_class(**{**om.MODEL_SIZES[f"{model_class.__name__}-tiny"], **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def tiny_inputs(batch=2, seed=1, lens=(3, 7)):
    """(x, timestep, y, mask) for the tiny sizes: captions with 3 and 7 real tokens of 7."""
    size = om.MODEL_SIZES["STDiT-tiny"]
    torch.manual_seed(seed)
    x = torch.randn(batch, 4, *size["input_size"])
    timestep = torch.tensor([10.0, 700.0][:batch])
    y = torch.randn(batch, 1, size["model_max_length"], size["caption_channels"])
    mask = (torch.arange(size["model_max_length"])[None] < torch.tensor(lens)[:, None]).long()
    return x, timestep, y, mask


TINY_T5_WORDS = ["<pad>", "</s>", "<unk>", "a", "dog", "runs", "on", "the", "beach", "."]


def save_tiny_t5(directory: Path, words=TINY_T5_WORDS, d_model: int = 24) -> Path:
    """A randomly initialised one-layer T5 encoder (``d_model`` channels, the tiny models' caption width) and a
    word-level tokenizer over ``words``, saved as a local transformers directory."""
    import tokenizers  # noqa: PLC0415  (only the text encoder tests need transformers)
    import transformers  # noqa: PLC0415

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(words), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_vae():
    """A randomly initialised AutoencoderKL with 4 latent channels and 2x downsampling."""
    import diffusers  # noqa: PLC0415  (only the VAE tests need diffusers)

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def attention(q, k, v, key_mask=None):
    """Explicit softmax attention of ``[N, Lq, H, D]`` queries over ``[N, Lk, H, D]`` keys; ``[N, Lq, H*D]``."""
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v).flatten(-2)


def layernorm_modulate(tokens, shift, scale):
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + scale) + shift


def assert_matches_upstream(model, upstream_forward) -> None:
    """The model's output and ``upstream_forward(model, ...)`` (a restatement of upstream's forward) agree in
    float64 on the tiny inputs; the model returns float32 ``[B, 2C, T, H, W]``."""
    model = model.double()
    x, timestep, y, mask = tiny_inputs()
    with torch.no_grad():
        out = model(x.double(), timestep, y.double(), mask)
        expected = upstream_forward(model, x.double(), timestep, y.double(), mask)
    assert out.shape == (x.shape[0], 2 * x.shape[1], *x.shape[2:]) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
