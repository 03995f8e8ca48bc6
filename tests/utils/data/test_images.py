import numpy as np
import pytest
from PIL import Image

from utils.data.images import (
    ImageReadError,
    clip_image_processor,
    load_rgb_image,
    preprocess_for_clip,
)


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgb_gray_rgba_and_16bit(tmp_path):
    rgb = np.zeros((6, 9, 3), np.uint8)
    rgb[..., 0] = 200
    assert (load_rgb_image(_save(tmp_path, "a.png", Image.fromarray(rgb))) == rgb).all()

    gray = load_rgb_image(_save(tmp_path, "g.png", Image.fromarray(np.full((4, 5), 77, np.uint8))))
    assert gray.shape == (4, 5, 3)
    assert (gray == 77).all()

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:2, :, 3] = 255  # top half opaque green, bottom transparent
    out = load_rgb_image(_save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA")))
    assert (out[:2, :, 1] == 255).all()
    assert (out[2:] == 0).all()

    deep = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    out = load_rgb_image(_save(tmp_path, "d.png", deep))
    assert out.dtype == np.uint8
    assert (out == 255).all()


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, "r.jpg", image, exif=exif)
    assert load_rgb_image(path).shape == (20, 10, 3)


@pytest.mark.parametrize(
    ("content", "message"), [(b"", "empty"), (b"not an image at all", "unreadable")]
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=f"bad.jpg: .*{message}"):
        load_rgb_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        load_rgb_image(tmp_path / "nope.png")


def test_clip_preprocessing_shape_and_centre_crop(tmp_path):
    processor = clip_image_processor(tmp_path, image_size=32)
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20] = 255  # left quarter white: cropped away by the centre crop
    pixels = preprocess_for_clip(processor, image)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0].max() < 0  # only black (normalised below zero) survives the crop
