"""Bad input: every kind of file a user's image folder holds, loaded, scanned and trained on."""

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggkit
from vggkit.data.transforms import EvalTransform, TrainTransform
from vggkit.data.images import ImageError, load_image
from vggkit.data.folders import ImageListDataset, scan_folder
from vggkit.data.folders import prepare_splits

SMALL = dict(weights=None, model="vgg11", width=1 / 16, image_size=32, batch_size=8, epochs=1, progress=False)


def solid(size=(40, 40), colour=(200, 30, 60), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def save_jpeg_with_orientation(path: Path, image: Image.Image, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def decompression_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 8x8 PNG whose header claims side x side pixels (400 million): PIL sees the size at open."""
    solid((8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 4  # after the signature and the chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# --------------------------------------------------------------------------- one file at a time


def test_modes_become_8_bit_rgb(tmp_path):
    solid(mode="L", colour=77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((5, 5)) == (77, 77, 77)

    rgba = solid(mode="RGBA", colour=(10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white background
    rgba.save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((5, 5)) == (10, 20, 30)

    palette = solid(colour=(0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").getpixel((3, 3)) == (0, 128, 255)

    solid(mode="CMYK", colour=(0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"), dtype=int)[20, 20]
    assert np.abs(red - (255, 0, 0)).max() <= 3

    deep = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(deep).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    loaded = np.asarray(load_image(tmp_path / "16bit.png"))
    assert loaded.dtype == np.uint8 and loaded[0, :, 0].tolist() == [0, 128, 255]  # rescaled, not clipped


def test_exif_rotated_photo_is_upright(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 30))  # red on the left third
    save_jpeg_with_orientation(tmp_path / "rotated.jpg", image, orientation=6)  # "rotate 90 CW to view"
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (30, 60)
    top = np.asarray(upright, dtype=int)[5, 15]
    assert top[0] > 200 and top[2] < 60  # the red third is now on top


def test_tiny_and_large_images(tmp_path):
    solid((10, 12)).save(tmp_path / "tiny.png")
    tiny = load_image(tmp_path / "tiny.png")
    assert EvalTransform(scale=36, crop=32)(tiny).shape == (3, 32, 32)  # upscaled, not refused
    assert TrainTransform(scale=(36, 48), crop=32)(tiny).shape == (3, 32, 32)
    solid((4000, 3000)).save(tmp_path / "large.png")
    assert load_image(tmp_path / "large.png").size == (4000, 3000)
    with pytest.raises(ImageError, match=r"bomb\.png: .*decompression bomb"):
        load_image(decompression_bomb(tmp_path / "bomb.png"))


def test_corrupt_truncated_and_non_images_name_the_file(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(2000))
    with pytest.raises(ImageError, match=r"garbage\.jpg: not an image PIL can read; remove or replace the file"):
        load_image(tmp_path / "garbage.jpg")
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated .*remove or replace the file"):
        load_image(truncated_jpeg(tmp_path / "cut.jpg"))
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png")


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """A permission error (simulated: the tests may run as root, where chmod 000 does not stop reads)."""
    path = tmp_path / "locked.png"
    solid().save(path)
    real_open = Image.open

    def refuse(fp, *args, **kwargs):
        if Path(fp) == path:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageError, match=r"locked\.png: permission denied; make the file readable \(chmod \+r\)"):
        load_image(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; see the simulated test")
def test_unreadable_file_chmod(tmp_path):
    path = tmp_path / "locked.png"
    solid().save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_non_ascii_names(tmp_path):
    folder = tmp_path / "données" / "chat_猫"
    folder.mkdir(parents=True)
    solid().save(folder / "été_ünïcödé_写真.png")
    scan = scan_folder(tmp_path / "données", verify=True)
    assert scan.classes == ["chat_猫"] and Path(scan.samples[0][0]).name == "été_ünïcödé_写真.png"
    assert load_image(scan.samples[0][0]).size == (40, 40)


# --------------------------------------------------------------------------- folders


def messy_folder(root: Path) -> Path:
    """Two classes of usable images in every mode, plus every kind of file that is not usable."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
        Image.fromarray(pixels).convert("L").save(folder / "grey.png")
        Image.fromarray(pixels).convert("RGBA").save(folder / "rgba.png")
        Image.fromarray(pixels).convert("P").save(folder / "palette.gif")
        Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
        Image.fromarray(pixels[:12, :10]).save(folder / "tiny_10px.png")
        save_jpeg_with_orientation(folder / "rotated.jpg", Image.fromarray(pixels[:, :30]), 8)
        Image.fromarray(pixels).save(folder / "ünïcödé_名前.png")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    truncated_jpeg(root / "blue" / "truncated.jpg")
    decompression_bomb(root / "blue" / "bomb.png")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(root / "blue" / "sixteen_bit.png")
    return root


def test_scan_skips_unusable_files_and_lists_them_once(tmp_path):
    root = messy_folder(tmp_path / "data")
    scan = scan_folder(root, verify=True)
    skipped = {Path(path).name: reason for path, reason in scan.skipped}
    assert set(skipped) == {"notes.txt", "corrupt.jpg", "truncated.jpg", "bomb.png"}
    assert "not an image file" in skipped["notes.txt"] and "decompression bomb" in skipped["bomb.png"]
    assert ".DS_Store" not in {Path(p).name for p, _ in scan.samples}
    assert scan.counts() == {"blue": 14, "red": 13}  # 6 + 7 modes each, blue also the 16-bit one


def test_finetune_on_a_messy_folder_warns_once_and_trains(tmp_path):
    root = messy_folder(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = vggkit.finetune(root, 2, output_dir=tmp_path / "out", **SMALL)
    messages = [str(w.message) for w in caught if "Skipped" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("Skipped 4 file(s)")
    assert all(name in messages[0] for name in ("notes.txt", "corrupt.jpg", "truncated.jpg", "bomb.png"))
    assert len(result.history) == 1 and sum(result.metrics["support"].values()) == 6  # 20% of 14 and 13


@pytest.mark.filterwarnings("ignore:Skipped 1 file")
def test_a_file_that_breaks_during_training_does_not_stop_the_epoch(tmp_path):
    root = messy_folder(tmp_path / "data")
    # Not verified up front: the corrupt files reach the data loader, which warns and moves on.
    with pytest.warns(UserWarning, match="Skipping unreadable image"):
        result = vggkit.finetune(root, 2, output_dir=tmp_path / "out", strategy="full", verify_images=False,
                                 **SMALL)
    assert len(result.history) == 1
    dataset = ImageListDataset([(str(root / "red" / "corrupt.jpg"), 0), (str(root / "red" / "red_0.png"), 1)])
    with pytest.warns(UserWarning, match=r"corrupt\.jpg"):
        image, label = dataset[0]
    assert label == 1 and image.size == (40, 40)


def test_empty_class_folder_is_an_error_before_training(tmp_path):
    root = messy_folder(tmp_path / "data")
    (root / "green").mkdir()
    (root / "green" / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match=r"Class folder\(s\) \['green'\] .* hold no usable image"):
        prepare_splits(root)
    with pytest.raises(ValueError, match="hold no usable image"):
        vggkit.finetune(root, 3, output_dir=tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_dataset_with_no_usable_image_is_an_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="No usable images in"):
        prepare_splits(tmp_path)
    with pytest.raises(ValueError, match="holds no class folders"):
        prepare_splits(tmp_path / "a")


def test_a_class_with_one_image_trains_without_validation(tmp_path):
    root = messy_folder(tmp_path / "data")
    (root / "single").mkdir()
    solid().save(root / "single" / "only.png")
    with pytest.warns(UserWarning, match=r"\['single'\] have a single image: it is used for training only"):
        splits = prepare_splits(root, 3)
    assert (str(root / "single" / "only.png"), 2) in splits.train
    assert all(label != 2 for _, label in splits.val)
