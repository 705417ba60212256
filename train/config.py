"""Typed training configurations: one :class:`TrainConfig` dataclass, the release's stages and the embedded tiny
default as plain entries of :data:`TRAIN_CONFIGS`, and ``field=value`` overrides parsed by each field's type.

The release stages (OpenVid-1M / Open-Sora 1.0): 16 frames at frame interval 3, bf16, AdamW at lr 2e-5 without
weight decay, gradient clipping at 1.0, EMA 0.9999, captions dropped with probability 0.1 (classifier-free
guidance), activation checkpointing. Each stage starts from the previous one (``init_from``); the first from
PixArt-alpha. Batch sizes are per GPU.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from openvid_models.dpm_solver import PREDICTIONS

DATA_SOURCES = ("sample-set", "csv", "latent-cache")
DTYPES = ("fp32", "bf16")


@dataclass
class TrainConfig:
    # -- model --------------------------------------------------------------------------------------------
    model: str = "STDiT-XL/2"  # a name in openvid_models.MODEL_SIZES (STDiT-* or MVDiT-*)
    hidden_size: int | None = None  # None: the named size's (the fields below override it for small models)
    depth: int | None = None
    num_heads: int | None = None
    patch_size: tuple[int, int, int] | None = None
    space_scale: float = 1.0  # position-embedding scales, as the release's configs
    time_scale: float = 1.0
    class_dropout_prob: float = 0.1  # captions replaced by the null caption (classifier-free guidance)
    freeze: str | None = None  # None, "not_temporal", "text" (STDiT.freeze)
    init_from: str | None = None  # .safetensors/.pt of the previous stage (or PixArt-alpha: an image model)
    grad_checkpointing: bool = True  # activation checkpointing per block ...
    checkpointed_blocks: int | None = None  # ... of the first N blocks only (None: all); fewer recompute less

    # -- text encoder and autoencoder -----------------------------------------------------------------------
    text_encoder: str = "tiny"  # a local T5 directory, or "tiny": a random frozen T5 with a tokenizer of the
    #                             sample set's words (saved in <outdir>/text_encoder, reused on resume)
    model_max_length: int = 120  # caption tokens
    tiny_t5_channels: int = 32  # the tiny T5's width (= the model's caption_channels)
    vae: str = "identity"  # a local diffusers AutoencoderKL directory, or "identity": train in pixel space
    vae_micro_batch_size: int = 4

    # -- data ----------------------------------------------------------------------------------------------
    data: str = "csv"  # one of DATA_SOURCES
    csv_path: str | None = None  # data="csv": the OpenVid-1M CSV ...
    video_root: str | None = None  # ... and the folder of its clips
    latent_cache: str | None = None  # data="latent-cache": a folder made by openvid_models.data.latent_cache
    sample_set_dir: str | None = None  # data="sample-set": where to write it (None: <outdir>/data)
    sample_set_clips: int = 96
    num_frames: int = 16
    frame_interval: int = 3
    image_size: int = 256
    batch_size: int = 8  # per data-parallel rank (a sequence-parallel group shares its samples)
    sp_size: int = 1  # sequence parallelism: ranks that split every sample's frames (Ulysses; divides the
    #                   world size, the latent frames and the heads)
    num_workers: int = 4

    # -- optimisation ---------------------------------------------------------------------------------------
    prediction: str = "eps"  # what the model predicts: "eps" (upstream; the released checkpoints) or "v", the
    #   velocity sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, whose MSE weighs an error in the clean sample about
    #   equally at every noise level (the tiny default needs it to learn where its captions put the shapes)
    v_weight_cap: float | None = None  # None: upstream's loss (noise MSE + vb). A number g: the noise MSE of
    #   timestep t weighted by min(1 / alpha_bar_t, g), the v-prediction loss's weight capped at g, so that the
    #   high-noise steps, where the caption decides colour and layout, count (prediction="v" goes further: the
    #   tiny default learns its captions' colours with the cap, and their motion only with v)
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    max_steps: int = 10_000
    dtype: str = "bf16"  # parameters in compute (FSDP2 MixedPrecisionPolicy); master weights, EMA and the
    #                      gradient reduction stay float32
    seed: int = 42

    # -- checkpoints, logs, the sample at the end --------------------------------------------------------------
    outdir: str = "outputs/run"
    ckpt_every: int = 1000  # steps; also on SIGTERM and at the end
    keep_checkpoints: int = 2  # the newest ones kept (older ones deleted once a newer one is complete)
    log_every: int = 10  # steps between TensorBoard points
    tensorboard: bool = False
    sample_at_end: bool = False  # sample a clip from the EMA weights after training (rank 0)
    sample_caption: str | None = None  # None: the first caption of the data
    sample_steps: int = 20  # DPM-Solver++ steps
    cfg_scale: float = 7.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"TrainConfig.{what}")

        need(self.data in DATA_SOURCES, f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.data == "csv":
            need(self.csv_path is not None and self.video_root is not None,
                 "csv_path and video_root are needed with data='csv' (or use --config tiny for the sample set)")
        if self.data == "latent-cache":
            need(self.latent_cache is not None, "latent_cache (a folder) is needed with data='latent-cache'")
        for name in ("num_frames", "frame_interval", "image_size", "batch_size", "max_steps", "ckpt_every",
                     "log_every", "sample_steps", "model_max_length", "keep_checkpoints", "sp_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(0.0 <= self.class_dropout_prob < 1.0, f"class_dropout_prob must be in [0, 1), got "
             f"{self.class_dropout_prob}")
        need(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        need(self.v_weight_cap is None or self.v_weight_cap >= 1, f"v_weight_cap must be None or >= 1, got "
             f"{self.v_weight_cap}")
        need(self.v_weight_cap is None or self.prediction == "eps", "v_weight_cap reweights the noise MSE of "
             "prediction='eps'; with prediction='v' the loss is the v MSE already (set v_weight_cap=None)")
        need(self.checkpointed_blocks is None or self.checkpointed_blocks >= 0,
             f"checkpointed_blocks must be None or >= 0, got {self.checkpointed_blocks}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")


_RELEASE = dict(num_frames=16, frame_interval=3, dtype="bf16", lr=2e-5, grad_clip=1.0, ema_decay=0.9999,
                class_dropout_prob=0.1, grad_checkpointing=True, data="csv", text_encoder="pretrained_models/t5",
                vae="pretrained_models/sd-vae-ft-ema")


def _release(model: str, image_size: int, batch_size: int, init_from: str | None, outdir: str) -> dict:
    return dict(_RELEASE, model=f"{model}-XL/2", image_size=image_size, batch_size=batch_size,
                space_scale=image_size / 512, init_from=init_from, outdir=outdir)


# Keyword arguments of TrainConfig by name: plain data, so `TrainConfig(**TRAIN_CONFIGS[name])` is the whole
# story. Paths of weights are the conventional ones; override them with --set init_from=... etc.
TRAIN_CONFIGS: dict[str, dict] = {
    "STDiT-16x256x256": _release("STDiT", 256, 8, "pretrained_models/PixArt-XL-2-512x512.pth",
                                 "outputs/STDiT-16x256x256"),
    "STDiT-16x512x512": _release("STDiT", 512, 2, "outputs/STDiT-16x256x256/ema.safetensors",
                                 "outputs/STDiT-16x512x512"),
    "STDiT-16x1024x1024": _release("STDiT", 1024, 1, "outputs/STDiT-16x512x512/ema.safetensors",
                                   "outputs/STDiT-16x1024x1024"),
    # MVDiT's text stream has no image-model counterpart: its first stage starts from scratch, as OpenVid-1M's.
    "MVDiT-16x256x256": _release("MVDiT", 256, 8, None, "outputs/MVDiT-16x256x256"),
    "MVDiT-16x512x512": _release("MVDiT", 512, 2, "outputs/MVDiT-16x256x256/ema.safetensors",
                                 "outputs/MVDiT-16x512x512"),
    # The embedded default: a tiny STDiT in pixel space (identity "VAE") on the generated sample set, small
    # enough for 2 CPU cores in under 10 minutes (9 min 39 s measured), then a sampled clip checked against its
    # caption. v prediction and 2400 steps are what it takes to learn the direction words (BENCHMARKS.md).
    "tiny": dict(model="STDiT-tiny", hidden_size=64, depth=3, num_heads=4, patch_size=(1, 2, 2),
                 class_dropout_prob=0.1, grad_checkpointing=False, text_encoder="tiny", model_max_length=16,
                 tiny_t5_channels=64, vae="identity", data="sample-set", sample_set_clips=96, num_frames=8,
                 frame_interval=4, image_size=16, batch_size=8, num_workers=0, lr=1e-3, weight_decay=0.0,
                 grad_clip=1.0, ema_decay=0.99, max_steps=2400, dtype="fp32", seed=0, outdir="outputs/default",
                 ckpt_every=500, sample_at_end=True, sample_steps=20, cfg_scale=4.0, prediction="v"),
}


# ---------------------------------------------------------------------------------------------------------
# Overrides: "field=value", parsed by the field's annotation
# ---------------------------------------------------------------------------------------------------------

_NONE = ("none", "null")


def _parse(text: str, annotation, name: str):
    """``text`` as a value of ``annotation`` (int, float, bool, str, a tuple of ints, or one of these | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(text, inner, name)
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if annotation in (int, float, str):
            return annotation(text)
        if origin is tuple:
            parts = [p for p in text.replace("(", "").replace(")", "").replace("x", ",").split(",") if p.strip()]
            values = tuple(int(p) for p in parts)
            if len(values) != len(args):
                raise ValueError
            return values
    except ValueError:
        raise ValueError(f"--set {name}={text}: expected a value of type {annotation}") from None
    raise TypeError(f"field {name} of type {annotation} cannot be set from the command line")


def apply_overrides(base: dict, overrides: list[str]) -> TrainConfig:
    """``TrainConfig(**base)`` with each ``"field=value"`` of ``overrides`` applied (later ones win)."""
    hints = typing.get_type_hints(TrainConfig)
    values = dict(base)
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set expects field=value, got {item!r}")
        if name not in hints:
            raise ValueError(f"--set {item}: TrainConfig has no field {name!r}; fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
        values[name] = _parse(text, hints[name], name)
    return TrainConfig(**values)


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


__all__ = ["DATA_SOURCES", "DTYPES", "TRAIN_CONFIGS", "TrainConfig", "apply_overrides", "config_to_dict"]
