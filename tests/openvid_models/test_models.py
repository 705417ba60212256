"""Behaviour both models share: weights through files, padded captions, the kernel path against the reference
path, activation checkpointing, classifier-free guidance, low-precision weights."""

import pytest
import torch
from safetensors.torch import save_file

import openvid_kernels as ok
import openvid_models as om
from openvid_kernels.backends import TRITON_INTERPRET
from tests.openvid_models.utils import tiny_inputs, tiny_model

MODELS = [om.STDiT, om.MVDiT]
by_name = pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)


@by_name
def test_weights_round_trip_through_files(model_class, tmp_path):
    model = tiny_model(model_class)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "trainer.pth")
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    inputs = tiny_inputs()
    size = om.MODEL_SIZES[f"{model_class.__name__}-tiny"]
    with torch.no_grad():
        expected = model(*inputs)
        for name in ("model.pt", "trainer.pth", "model.safetensors"):
            loaded = model_class.from_pretrained(tmp_path / name, **size).eval()
            torch.testing.assert_close(loaded(*inputs), expected, rtol=0, atol=0)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        om.load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        om.load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .safetensors, .pt, .pth or .bin file"):
        om.load_state_dict(tmp_path / "weights.npz")


@by_name
def test_padded_caption_tokens_never_change_the_output(model_class):
    model = tiny_model(model_class)
    x, timestep, y, mask = tiny_inputs()
    changed = y.clone()
    changed[0, :, 3:] = torch.randn_like(changed[0, :, 3:]) * 100
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep, changed, mask), model(x, timestep, y, mask), rtol=0, atol=0)


@pytest.mark.skipif(not TRITON_INTERPRET, reason="the kernel path on CPU tensors needs the Triton interpreter")
@by_name
def test_kernel_path_matches_reference_path_forward_and_backward(model_class):
    model = tiny_model(model_class)
    inputs = tiny_inputs()

    def run(backend):
        model.zero_grad()
        with ok.use_backend(backend):
            out = model(*inputs)
            out.square().mean().backward()
        # MVDiT: the last block's text-stream MLP and modulation reach no output, so get no gradient (as upstream).
        return out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run("reference")
    out, grads = run("triton")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    assert sum(g is not None for g in grads) > len(grads) // 2
    for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        if ref is not None:
            torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


@by_name
def test_activation_checkpointing_gives_the_same_gradients(model_class):
    model = tiny_model(model_class).train()
    inputs = tiny_inputs()
    results = []
    for checkpointing, blocks in ((False, None), (True, None), (True, 1)):  # none, all, the first block only
        model.grad_checkpointing, model.checkpointed_blocks = checkpointing, blocks
        model.zero_grad()
        torch.manual_seed(5)  # the caption dropout draws
        model(*inputs).square().mean().backward()
        results.append([p.grad for p in model.parameters()])
    for plain, *checkpointed in zip(*results):
        for grad in checkpointed:
            assert (plain is None) == (grad is None)
            if plain is not None:
                torch.testing.assert_close(grad, plain)


@by_name
def test_null_caption_dropout_and_classifier_free_guidance_batches(model_class):
    model = tiny_model(model_class)
    x, timestep, y, mask = tiny_inputs()
    null = model.y_embedder.y_embedding.expand_as(y)
    with torch.no_grad():
        dropped = model(x, timestep, y, mask, force_drop_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(dropped[0], model(x, timestep, null, mask)[0])
        torch.testing.assert_close(dropped[1], model(x, timestep, y, mask)[1])
        # A CFG batch (conditional + unconditional) with the mask of the conditional half only, as upstream.
        both = model(x.repeat(2, 1, 1, 1, 1), timestep.repeat(2), torch.cat([y, null]), mask)
        torch.testing.assert_close(both[:2], model(x, timestep, y, mask))


@by_name
def test_bf16_weights_run_and_return_float32(model_class):
    model = tiny_model(model_class).to(torch.bfloat16)
    with torch.no_grad():
        out = model(*tiny_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@by_name
def test_bad_freeze_option_is_named(model_class):
    with pytest.raises(ValueError, match="freeze must be None or one of"):
        tiny_model(model_class, freeze="everything")
