"""center_crop_arr against hand-computed ADM crops on synthetic images."""

import numpy as np
import pytest
from PIL import Image

from dcdit.data.latents import ImageFolderDataset, center_crop_arr


def gradient(w, h):
    """RGB image: R = horizontal ramp 0..255, G = vertical ramp, B = 77."""
    xs = np.linspace(0, 255, w)
    ys = np.linspace(0, 255, h)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.round(xs)[None, :]
    arr[..., 1] = np.round(ys)[:, None]
    arr[..., 2] = 77
    return Image.fromarray(arr)


def test_300x200_to_64_by_hand():
    img = gradient(300, 200)
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)
    # by hand: 200 >= 128 -> BOX halve to 150x100; 100 < 128 stop; bicubic x0.64 to 96x64; crop x 16..80
    ref = img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    ref = np.asarray(ref)[0:64, 16:80]
    assert np.array_equal(np.asarray(out), ref)
    # the crop is centred: its centre pixel shows the source centre of the ramps (x~151/300, y~100/200)
    c = np.asarray(out)[32, 32].astype(float)
    assert abs(c[0] - 255 * 151.1 / 299) < 3
    assert abs(c[1] - 255 * 100.3 / 199) < 4
    assert c[2] == 77


def test_repeated_box_halving():
    img = gradient(1000, 600)
    out = center_crop_arr(img, 64)
    # 600 -> 300 -> 150 (>= 128) -> 75: three halvings: 1000x600 -> 500x300 -> 250x150 -> 125x75
    ref = img
    for size in [(500, 300), (250, 150), (125, 75)]:
        ref = ref.resize(size, Image.BOX)
    ref = ref.resize((round(125 * 64 / 75), 64), Image.BICUBIC)  # (107, 64)
    left = (107 - 64) // 2
    ref = np.asarray(ref)[:, left:left + 64]
    assert np.array_equal(np.asarray(out), ref)


def test_portrait_upscale_and_identity():
    img = gradient(40, 50)  # smaller side 40 < 64: only a bicubic upscale to 64x80, crop y 8..72
    out = center_crop_arr(img, 64)
    ref = np.asarray(img.resize((64, 80), Image.BICUBIC))[8:72, :]
    assert np.array_equal(np.asarray(out), ref)
    sq = gradient(32, 32)
    assert np.array_equal(np.asarray(center_crop_arr(sq, 32)), np.asarray(sq))


@pytest.mark.parametrize("w,h,s", [(333, 222, 32), (31, 97, 32), (256, 256, 16), (517, 389, 48)])
def test_output_size(w, h, s):
    assert center_crop_arr(gradient(w, h), s).size == (s, s)


def test_image_folder(tmp_path):
    for c in ("zebra", "ant"):
        (tmp_path / c / "sub").mkdir(parents=True)
    gradient(40, 30).save(tmp_path / "ant" / "b.png")
    gradient(30, 40).convert("L").save(tmp_path / "ant" / "a.JPG")
    gradient(50, 50).save(tmp_path / "zebra" / "sub" / "c.bmp")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert ds.classes == ["ant", "zebra"] and ds.class_to_idx == {"ant": 0, "zebra": 1}
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["a.JPG", "b.png", "c.bmp"]
    assert ds.targets == [0, 0, 1] and len(ds) == 3
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype.is_floating_point
        assert x.min() >= -1 and x.max() <= 1
    # pixel values: [-1, 1] rescaling of the centre-cropped RGB image
    x, _ = ds[1]
    ref = np.asarray(center_crop_arr(Image.open(tmp_path / "ant" / "b.png").convert("RGB"), 16)).astype(np.float64)
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref / 127.5 - 1, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")


@pytest.mark.parametrize("w,h", [(40, 51), (51, 40)])
def test_odd_excess_rounds_offset_down(w, h):
    img = gradient(w, h)
    out = np.asarray(center_crop_arr(img, 32))
    # 40 -> 32 is x0.8; the other side 51 * 0.8 = 40.8 -> 41; excess 9 -> offset floor(9 / 2) = 4
    big = np.asarray(img.resize((32, 41) if w < h else (41, 32), Image.BICUBIC))
    ref = big[4:36, :] if w < h else big[:, 4:36]
    assert np.array_equal(out, ref)
