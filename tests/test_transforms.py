"""The pre-training augmentation, against torchvision's transforms the authors used."""

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
import PIL
from PIL import Image
from torchvision.transforms import ColorJitter, InterpolationMode

from dbot_ds.data.device_decode import collate_jpegs, decode_batch, jpeg_sample
from dbot_ds.data.transforms import color_jitter, decode_crop, random_resized_crop_flip, rrc_box
from dbot_ds.input_norms import IMAGENET


@pytest.fixture(scope="module")
def textured():
    """A 48x40 JPEG with fine structure, where bilinear and bicubic resampling differ."""
    yy, xx = np.mgrid[0:40, 0:48]
    img = 127 + 60 * np.sin(xx / 3.0)[..., None] * np.array([1, 0.5, -1]) + 50 * np.cos(yy / 5.0)[..., None]
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()


def torchvision_crop(data: bytes, seed: int, size: int = 24, scale=(0.3, 1.0)) -> torch.Tensor:
    """The authors' RandomResizedCrop(interpolation=3, i.e. bicubic) given our drawn box."""
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, h, w = rrc_box(pil.height, pil.width, scale, random.Random(seed))
    out = TF1.resized_crop(pil, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def test_the_cpu_crop_is_torchvisions_bicubic_resized_crop_of_the_drawn_box(textured):
    for seed in range(6):
        ours = decode_crop(textured, 24, (0.3, 1.0), False, random.Random(seed))
        diff = (ours.int() - torchvision_crop(textured, seed).int()).abs()
        assert diff.float().mean() < 0.25 and diff.max() <= 2  # the two JPEG decoders differ by a level or two


def test_the_generated_image_path_crops_bicubic_too():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 40, 48), dtype=np.uint8))
    ours = random_resized_crop_flip(img, 24, (0.3, 1.0), False, random.Random(1))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    top, left, h, w = rrc_box(40, 48, (0.3, 1.0), random.Random(1))
    ref = torch.from_numpy(np.array(TF1.resized_crop(pil, top, left, h, w, [24, 24], InterpolationMode.BICUBIC)))
    assert (ours.int() - ref.permute(2, 0, 1).int()).abs().float().mean() < 1.0


def device_crops(data: bytes, seeds) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    batch = collate_jpegs([jpeg_sample(data, (0.3, 1.0), True, random.Random(s)) for s in seeds])
    return ((decode_batch(batch, 24, torch.device("cpu"), torch.float32) * std + mean) * 255).round()


def test_the_device_decode_crops_match_the_cpu_crops(textured):
    """One batched resize of all crops, as PIL's bicubic box resize: the same crops as the CPU
    path (both decoders are libjpeg-turbo here; other JPEG decoders differ by a level)."""
    dev = device_crops(textured, range(6))
    for seed in range(6):
        cpu = decode_crop(textured, 24, (0.3, 1.0), True, random.Random(seed))
        assert (dev[seed] - cpu.float()).abs().max() <= 1


def test_the_batched_resize_is_pils_bicubic_box_resize_on_the_same_pixels(textured):
    from dbot_ds.data.device_decode import decode_on_device, resize_crops
    batch = collate_jpegs([jpeg_sample(textured, (0.1, 1.0), False, random.Random(s)) for s in range(8)])
    images = decode_on_device(batch.jpegs(), torch.device("cpu"))
    ours = resize_crops(images, batch.boxes, batch.flips, 24)
    for img, (top, left, h, w), got in zip(images, batch.boxes.tolist(), ours):
        ref = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(
            (24, 24), Image.BICUBIC, box=(left, top, left + w, top + h), reducing_gap=None)
        assert (got - torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()).abs().max() <= 1


def test_without_torchcodec_the_device_decoder_falls_back_to_torchvision(textured, monkeypatch):
    import sys

    from dbot_ds.data import device_decode
    pytest.importorskip("torchcodec")  # a dev dependency: the preferred decoder
    with_codec = device_crops(textured, range(3))
    assert device_decode.jpeg_decoder().library == "torchcodec"
    device_decode.jpeg_decoder.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # import torchcodec -> ImportError
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    try:
        assert device_decode.jpeg_decoder().library == "torchvision"
        assert torch.equal(device_crops(textured, range(3)), with_codec)
    finally:
        device_decode.jpeg_decoder.cache_clear()


def test_colour_jitter_draws_as_torchvisions_color_jitter():
    """ColorJitter(0.4, 0.4, 0.4), the CLIP recipe's: brightness, contrast, saturation factors
    in [0.6, 1.4] in a random order. Same distribution of image statistics over 300 draws."""
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))

    def stats(images):
        arrays = [np.asarray(a, dtype=float) for a in images]
        return np.array([[a.mean(), a.std(), (a.max(-1) - a.min(-1)).mean()] for a in arrays])

    ours = stats(color_jitter(base, 0.4, random.Random(s)) for s in range(300))
    jitter = ColorJitter(0.4, 0.4, 0.4)
    theirs = stats(jitter(base) for s in range(300) if torch.manual_seed(s) is not None)
    assert np.allclose(ours.mean(0), theirs.mean(0), rtol=0.05)
    assert np.allclose(ours.std(0), theirs.std(0), rtol=0.15)
    assert color_jitter(base, 0.0, random.Random(0)) is base


def test_jitter_changes_colours_but_not_the_crop_or_flip(textured):
    for seed in range(4):
        plain = decode_crop(textured, 24, (0.3, 1.0), True, random.Random(seed))
        assert torch.equal(plain, decode_crop(textured, 24, (0.3, 1.0), True, random.Random(seed), jitter=0.0))
        jittered = decode_crop(textured, 24, (0.3, 1.0), True, random.Random(seed), jitter=0.4)
        assert not torch.equal(plain, jittered)
        # same geometry: the jittered crop correlates with the plain one pixel by pixel
        corr = np.corrcoef(plain.float().mean(0).flatten(), jittered.float().mean(0).flatten())[0, 1]
        assert corr > 0.9


def test_randaugment_at_its_top_magnitude_posterizes_to_black_instead_of_failing(textured):
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10; Pillow 13 refuses 0 bits. The
    authors' Pillow gave a black image, and so do we: a valid image is never made 'bad data'."""
    from timm.data.auto_augment import AugmentOp

    from dbot_ds.data.transforms import with_zero_bit_posterize

    class Holder:  # what create_transform returns: a Compose with .transforms
        def __init__(self, ops):
            from timm.data.auto_augment import RandAugment
            self.transforms = [RandAugment(ops, num_layers=1)]

    img = Image.open(io.BytesIO(textured)).convert("RGB")
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    if int(PIL.__version__.split(".")[0]) >= 13:  # what this guards against (older Pillows posterize to 0 bits)
        with pytest.raises(ValueError, match="bits"):
            op(img)  # as timm builds it
    with_zero_bit_posterize(Holder([op]))
    assert np.asarray(op(img)).max() == 0
    fewer = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)
    with_zero_bit_posterize(Holder([fewer]))
    assert len(np.unique(np.asarray(fewer(img)))) <= 4  # 2 bits kept: Pillow's own posterize


def test_the_finetune_transform_never_turns_a_valid_image_into_a_bad_sample(textured):
    from dbot_ds.data.transforms import ClassifySample

    sample = ClassifySample(32, "rand-m10-mstd0-inc1", 0.25, "pixel")  # every op at magnitude 10
    for i in range(60):
        img, label = sample({"jpg": textured, "cls": b"3"}, random.Random(i))
        assert img.shape == (3, 32, 32) and label == 3


def test_only_unreadable_images_are_bad_data_and_a_transform_bug_surfaces(tmp_path):
    from helpers import stream, write_shards

    from dbot_ds.data.transforms import UnreadableImage, open_rgb

    with pytest.raises(UnreadableImage, match="unreadable image"):
        open_rgb(b"\xff\xd8 not a jpeg")
    manifest = write_shards(tmp_path, [8])

    def buggy(sample, rng):
        raise ValueError("a bug in a transform")

    with pytest.raises(ValueError, match="a bug in a transform"):
        list(stream(manifest, micro=4, sample_fn=buggy))
