"""The caption cleaning and the T5 encoder wrapper on a tiny randomly initialised T5 (no hub access)."""

import pytest
import torch

from openvid_models import STDiT
from openvid_models.text_encoder import T5TextEncoder, clean_caption, null_caption
from tests.openvid_models.utils import save_tiny_t5, tiny_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("ftfy")
pytest.importorskip("bs4")


@pytest.mark.parametrize("raw,clean", [
    ("A Dog Runs On The Beach.", "a dog runs on the beach."),
    ("see https://example.com/clip.mp4 and www.example.org now", "see and now"),
    ("<b>bold</b> &amp; <i>italic</i> text", "bold italic text"),
    ("a cat \u2014 sleeping \u201con\u201d a mat", 'a cat - sleeping "on" a mat'),
    ("photo by @someone of a \u4e2d\u6587 lake", "photo by of a lake"),
    ("  \"a quiet street at night\"  ", "a quiet street at night"),
    ("red-car-on-a-wet-road", "red car on a wet road"),
    ("free shipping! item jc6640 click for details", "! item"),
])
def test_captions_are_cleaned_as_in_training(raw, clean):
    assert clean_caption(raw) == clean


def tiny_encoder(tmp_path, length=6):
    return T5TextEncoder.from_pretrained(save_tiny_t5(tmp_path / "t5"), device="cpu", dtype=torch.float32,
                                         model_max_length=length)


def test_encode_pads_to_the_max_length_with_a_mask_of_real_tokens(tmp_path):
    encoder = tiny_encoder(tmp_path)
    out = encoder.encode(["A dog runs.", "the dog runs on the beach the dog runs"])
    assert out["y"].shape == (2, 1, 6, 24) and out["y"].dtype == torch.float32
    assert out["mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]  # "a dog runs ." + </s>; truncated
    alone = encoder.encode(["A dog runs."])
    torch.testing.assert_close(alone["y"][0, 0, :5], out["y"][0, 0, :5])  # real tokens do not see padding
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("a dog")


def test_null_caption_is_the_models_learned_embedding():
    model = tiny_model(STDiT)
    null = null_caption(model, 3)
    assert null.shape == (3, 1, *model.y_embedder.y_embedding.shape)
    assert torch.equal(null[2, 0], model.y_embedder.y_embedding)
