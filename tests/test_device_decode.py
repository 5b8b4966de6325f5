"""Decoding and rescaling on the device (nvJPEG on CUDA), exercised here on CPU tensors against the PIL path."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_photos

from vggkit.data.images import load_image
from vggkit.data.device_decode import decode_on_device, is_plain_jpeg, read_source, resize_all, resize_shortest
from vggkit.evaluation.protocols import rescaled_view


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """A photograph (500x375, ImageNet's usual size), noise of another shape, and a small image to upscale."""
    folder = tmp_path_factory.mktemp("jpegs")
    arrays = {"photo": np.asarray(Image.fromarray(skimage_photos.chelsea()).resize((500, 375))),
              "portrait": noise(400, 300, seed=1), "small": noise(60, 80, seed=2)}
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / f"{name}.jpg"
        Image.fromarray(array).save(paths[name], quality=90)
    return paths


@pytest.mark.parametrize("scale", [224, 256, 384, 512])
def test_tensor_decode_and_rescale_agree_with_pil_within_one_level(jpegs, scale):
    """The stated tolerance: decoded pixels equal (libjpeg on both CPU paths); rescaled uint8 images
    at most 1 level apart in any pixel and under 0.3 of a level on average."""
    paths = list(jpegs.values())
    data = [read_source(path) for path in paths]
    assert all(d.dim() == 1 for d in data)  # plain JPEGs travel as their bytes
    decoded = decode_on_device(data, paths, "cpu")
    for path, image in zip(paths, decoded):
        pil = load_image(path)
        assert torch.equal(image, torch.from_numpy(np.array(pil)).permute(2, 0, 1))
        ours, theirs = resize_shortest(image[None], scale)[0], rescaled_view(pil, scale)
        assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
        difference = (ours.int() - theirs.int()).abs().float()
        assert difference.max() <= 1 and difference.mean() < 0.3, (path.name, scale)


def test_images_of_one_size_are_rescaled_together_and_keep_their_order():
    images = [torch.from_numpy(noise(*size, seed=i)).permute(2, 0, 1)
              for i, size in enumerate(((375, 500), (500, 375), (375, 500)))]
    together = resize_all(images, 256)
    assert [tuple(view.shape) for view in together] == [(3, 256, 341), (3, 341, 256), (3, 256, 341)]
    for image, view in zip(images, together):
        assert torch.equal(view, resize_shortest(image[None], 256)[0])


def test_what_decode_jpeg_cannot_read_goes_through_pil_with_the_same_reasons(jpegs, tmp_path):
    rgb = noise(50, 70)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).save(tmp_path / "png.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: decode_jpeg would ignore the tag
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert not is_plain_jpeg(tmp_path / "cmyk.jpg") and not is_plain_jpeg(tmp_path / "rotated.jpg")
    assert is_plain_jpeg(tmp_path / "grey.jpg") and not is_plain_jpeg(tmp_path / "png.png")

    for name in ("cmyk.jpg", "png.png", "rotated.jpg"):  # decoded by load_image, upright RGB
        data = read_source(tmp_path / name)
        assert data.dim() == 3 and torch.equal(data, torch.from_numpy(np.array(load_image(tmp_path / name)))
                                               .permute(2, 0, 1))
    assert read_source(tmp_path / "rotated.jpg").shape == (3, 70, 50)
    assert read_source(Image.fromarray(rgb)).shape == (3, 50, 70)  # an in-memory image

    # A corrupt file in a batch: the others still decode, it gets load_image's reason.
    paths = [jpegs["photo"], tmp_path / "grey.jpg", jpegs["small"]]
    data = [read_source(path) for path in paths]
    data.insert(1, torch.frombuffer(bytearray((tmp_path / "broken.jpg").read_bytes()), dtype=torch.uint8))
    paths.insert(1, tmp_path / "broken.jpg")
    decoded = decode_on_device(data, paths, "cpu")
    with pytest.raises(Exception) as pil_error:
        load_image(tmp_path / "broken.jpg")
    assert decoded[1] == pil_error.value.reason
    assert [tuple(image.shape) for i, image in enumerate(decoded) if i != 1] == [(3, 375, 500), (3, 50, 70),
                                                                                (3, 60, 80)]
    assert torch.equal(decoded[2][0], torch.from_numpy(np.array(Image.open(tmp_path / "grey.jpg"))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_decodes_and_rescales_on_the_gpu_close_to_pil(jpegs):
    paths = list(jpegs.values())
    decoded = decode_on_device([read_source(path) for path in paths], paths, "cuda")
    for path, image in zip(paths, decoded):
        assert image.is_cuda
        ours, theirs = resize_shortest(image[None], 256)[0].cpu(), rescaled_view(load_image(path), 256)
        difference = (ours.int() - theirs.int()).abs().float()
        assert difference.mean() < 1.5, path.name  # nvJPEG's IDCT and chroma upsampling are not libjpeg's


def test_a_rescaled_size_over_the_pixel_limit_gets_the_pil_paths_reason(jpegs, monkeypatch):
    from vggkit.data.images import ImageError, rescale_shortest

    monkeypatch.setenv("VGGKIT_MAX_PIXELS", "300000")  # 500x375 and 341x256 fit; 682x512 does not
    path = jpegs["photo"]
    image, = decode_on_device([read_source(path)], [path], "cpu", scales=(256,))
    assert image.shape == (3, 375, 500)
    reason, = decode_on_device([read_source(path)], [path], "cpu", scales=(256, 512))
    with pytest.raises(ImageError) as pil_error:
        rescale_shortest(load_image(path), 512)
    assert reason == pil_error.value.reason and "over the limit" in reason
