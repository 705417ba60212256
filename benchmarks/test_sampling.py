"""Text-to-video sampling with STDiT-XL/2 (random weights: the speed does not depend on them), bf16.

Cases:
  step       one guided IDDPM step at 16x512x512: a DiT forward over batch 2 ([cond; null]) + the update;
             providers ``ours`` (openvid_kernels) and ``eager`` (the same model on the reference ops), timed
             by the harness (median of many CUDA-graph replays).
  iddpm-100  a whole 100-step IDDPM sample with guidance (one prompt, batch 2 in the DiT), launched from Python
             DiT + sampler time, once per provider: ``ours`` and ``eager`` launched from Python, ``ours-graph``
             replaying the DiT forward from a CUDA graph (what the CLI does).
  dpm-20     DPM-Solver++ with 20 steps end to end as the CLI runs it: T5-XXL encoding and release (random
             weights, T5 v1.1 XXL shape), the DiT (CUDA graph), and the SD VAE (sd-vae-ft-ema shape) decoding
             16 frames of 512 x 512, each timed.
  1024       16x1024x1024 on one GPU: seconds per DPM-Solver++ step and the peak memory of DiT + VAE decode.
Targets (issue #7, reported not asserted): iddpm-100 DiT time <= 10 s; step time ours <= 0.65x eager.
"""

from __future__ import annotations

import time

import pytest
import torch

import harness

pytestmark = harness.requires_device()

SMOKE = harness.smoke_mode()
DTYPE = torch.float32 if SMOKE else torch.bfloat16
FRAMES, SIDE_512, SIDE_1024 = (3, 6, 8) if SMOKE else (16, 64, 128)  # latent sides
SIZE = "STDiT-tiny" if SMOKE else "STDiT-XL/2"
PROVIDERS = ["ours", "eager"]
harness.register_provider("ours", harness.PROVIDER_PROBES["ours-triton"], baseline=False)
harness.register_provider("ours-graph", harness.PROVIDER_PROBES["ours-triton"], baseline=False)


def build_model(side: int):
    import openvid_models as om  # noqa: PLC0415  (collection stays free of model imports)

    torch.manual_seed(0)
    size = dict(om.MODEL_SIZES[SIZE], input_size=(FRAMES, side, side))
    with torch.device(harness.device()):
        return om.STDiT(**size).to(DTYPE).eval()


def caption(model, n: int = 1, real: int = 100):
    """T5-shaped caption features for n prompts with ``real`` real tokens each."""
    L, channels = model.y_embedder.y_embedding.shape
    dev = harness.device()
    y = torch.randn(n, 1, L, channels, device=dev, dtype=DTYPE)
    mask = (torch.arange(L, device=dev)[None] < min(real, L)).expand(n, L).long()
    return {"y": y, "mask": mask}


class Encoded:
    def __init__(self, encoded):
        self.encoded = encoded

    def encode(self, prompts):
        return self.encoded


def dit_flops(model, batch: int) -> int:
    C = model.t_block[1].in_features
    S, T, L = model.num_spatial, model.num_temporal, model.y_embedder.y_embedding.shape[0]
    return len(model.blocks) * batch * T * S * (36 * C * C + 4 * C * (S + T + L))


def sync():
    if harness.device().type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) of fn() from Python launches, synchronised before and after."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


@pytest.mark.parametrize("provider", PROVIDERS)
def test_step(benchmark, provider):
    import openvid_models as om  # noqa: PLC0415

    case = f"STDiT-XL/2 guided IDDPM step 16x512x512 batch 2 {str(DTYPE)[6:]}"
    harness.require_provider(provider, case=case)
    ok = harness.openvid()
    model = build_model(SIDE_512)
    sampler = om.IDDPM(num_sampling_steps=100, cfg_scale=7.0)
    text = caption(model)
    kwargs = dict(y=torch.cat([text["y"], om.text_encoder.null_caption(model, 1).to(DTYPE)]), mask=text["mask"])
    x = torch.randn(2, 4, FRAMES, SIDE_512, SIDE_512, device=harness.device())
    t = torch.full((2,), 50, device=harness.device(), dtype=torch.long)

    def call(x_in, timestep, y, mask):
        return model(x_in.to(DTYPE), timestep, y=y, mask=mask)

    def guided(x_in, timestep, **kw):
        return om.forward_with_cfg(call, x_in, timestep, cfg_scale=7.0, cfg_channel=4, **kw)

    def step():
        with torch.no_grad(), ok.use_backend("auto" if provider == "ours" else "reference"):
            return sampler.p_sample(guided, x, t, clip_denoised=False, model_kwargs=kwargs)["sample"]

    harness.bench(benchmark, step, case=case, provider=provider, flops=dit_flops(model, 2), model=SIZE)


@pytest.mark.parametrize("provider", ["ours-graph", *PROVIDERS])
def test_iddpm_100_steps(benchmark, provider):
    import openvid_models as om  # noqa: PLC0415
    from openvid_models.sample import CUDAGraphed  # noqa: PLC0415

    harness.require_provider(provider, case="STDiT-XL/2 IDDPM 100 steps + CFG 16x512x512")
    if provider == "ours-graph" and harness.device().type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    ok = harness.openvid()
    model = build_model(SIDE_512)
    model = CUDAGraphed(model) if provider == "ours-graph" else model
    sampler = om.IDDPM(num_sampling_steps=100, cfg_scale=7.0)
    encoded = Encoded(caption(model))
    z_size = (4, FRAMES, SIDE_512, SIDE_512)
    dev = harness.device()

    def run():
        with ok.use_backend("reference" if provider == "eager" else "auto"):
            return sampler.sample(model, encoded, z_size, ["p"], dev, progress=False, dtype=DTYPE,
                                  generator=torch.Generator(dev).manual_seed(0))

    om.IDDPM(num_sampling_steps=3).sample(model, encoded, z_size, ["p"], dev, progress=False, dtype=DTYPE)  # warm
    latents, seconds = timed(run)
    assert torch.isfinite(latents).all()
    benchmark.extra_info.update(case="STDiT-XL/2 IDDPM 100 steps + CFG 16x512x512", provider=provider,
                                dit_seconds=seconds, per_step_ms=seconds * 10)
    print(f"\n[iddpm-100] {provider}: {seconds:.2f} s DiT+sampler ({seconds * 10:.1f} ms/step)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def random_t5_xxl(dev):
    """T5 v1.1 XXL's encoder (4096 wide, 24 layers, 64 heads, gated GELU) with random weights, and a word-level
    tokenizer (the timing does not depend on either's values)."""
    import tokenizers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from openvid_models.text_encoder import T5TextEncoder  # noqa: PLC0415

    words = ["<pad>", "</s>", "<unk>", *[f"w{i}" for i in range(1000)]]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    if SMOKE:
        config = transformers.T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    else:
        config = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True)
    with torch.device(dev):
        encoder = transformers.T5EncoderModel(config).to(DTYPE)
    return T5TextEncoder(encoder, tokenizer, model_max_length=120 if not SMOKE else 7, clean=False)


def sd_vae(dev):
    """sd-vae-ft-ema's AutoencoderKL shape, random weights."""
    import diffusers  # noqa: PLC0415

    from openvid_models.vae import VideoAutoencoder  # noqa: PLC0415

    blocks = (8, 16) if SMOKE else (128, 256, 512, 512)
    with torch.device(dev):
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks,
                                      layers_per_block=1 if SMOKE else 2, norm_num_groups=8 if SMOKE else 32,
                                      down_block_types=("DownEncoderBlock2D",) * len(blocks),
                                      up_block_types=("UpDecoderBlock2D",) * len(blocks))
    return VideoAutoencoder(vae.to(DTYPE).eval(), micro_batch_size=2)


def test_dpm_solver_20_steps_end_to_end(benchmark):
    """What the CLI does after loading: encode, release T5, 20 guided DiT steps (CUDA graph), VAE decode."""
    from openvid_models.sample import SampleConfig, TextToVideo  # noqa: PLC0415

    dev = harness.device()
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    model = build_model(SIDE_512)
    config = SampleConfig(SIZE, num_frames=FRAMES, sampler="dpm-solver", num_sampling_steps=20,
                          dtype="fp32" if SMOKE else "bf16", vae_micro_batch_size=2)
    t5, vae = random_t5_xxl(dev), sd_vae(dev)
    prompts = [" ".join(f"w{i}" for i in range(90))]
    TextToVideo(model, t5, vae, config, dev, text_encoder_after="keep")(prompts, progress=False)  # warm-up
    pipe = TextToVideo(model, t5, vae, config, dev, text_encoder_after="free")  # as the CLI
    encoded, t5_s = timed(lambda: pipe.encode(prompts))  # T5 on the GPU, then released
    sampler = pipe.sampler
    z_size = pipe.latent_size
    latents, dit_s = timed(lambda: sampler.sample(pipe.denoiser, Encoded(encoded), z_size, prompts, dev,
                                                  progress=False, dtype=pipe.dtype))
    with torch.no_grad():
        pixels, vae_s = timed(lambda: vae.decode(latents.to(pipe.dtype)))
    assert pixels.shape[-2:] == (SIDE_512 * (2 if SMOKE else 8),) * 2
    total = t5_s + dit_s + vae_s
    benchmark.extra_info.update(case="STDiT-XL/2 DPM-Solver++ 20 steps 16x512x512 end to end", t5_seconds=t5_s,
                                dit_seconds=dit_s, vae_seconds=vae_s, total_seconds=total)
    print(f"\n[dpm-20] T5 encode + release {t5_s:.3f} s + DiT {dit_s:.2f} s + VAE {vae_s:.2f} s = {total:.2f} s")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_1024_fits_one_gpu(benchmark):
    import openvid_models as om  # noqa: PLC0415

    dev = harness.device()
    pytest.importorskip("diffusers")
    model = build_model(SIDE_1024)
    vae = sd_vae(dev)
    vae.micro_batch_size = 1
    encoded = Encoded(caption(model))
    z_size = (4, FRAMES, SIDE_1024, SIDE_1024)
    steps = 4
    om.DPMSolverSampler(num_sampling_steps=2).sample(model, encoded, z_size, ["p"], dev, progress=False, dtype=DTYPE)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = om.DPMSolverSampler(num_sampling_steps=steps)
    latents, seconds = timed(lambda: sampler.sample(model, encoded, z_size, ["p"], dev, progress=False, dtype=DTYPE))
    with torch.no_grad():
        _, vae_s = timed(lambda: vae.decode(latents.to(DTYPE)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    benchmark.extra_info.update(case="STDiT-XL/2 16x1024x1024", per_step_s=seconds / steps, vae_seconds=vae_s,
                                peak_gib=peak)
    print(f"\n[1024] {seconds / steps:.3f} s/step (batch 2 with CFG), VAE decode {vae_s:.2f} s, peak {peak:.1f} GiB")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
