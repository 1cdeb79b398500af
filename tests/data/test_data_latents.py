"""Latent extraction + LatentDataset against a tiny random diffusers.AutoencoderKL encoded online."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from dcdit.data import LatentDataset, build_dataset, check_latent_meta, read_latent_meta  # noqa: E402
from dcdit.data.latents import center_crop_arr, extract_features  # noqa: E402

VAE_ID = "test/tiny-random-vae"
SCALE = 0.5
SIZES = {"cat": [(40, 32), (32, 48), (64, 64)], "dog": [(50, 70), (33, 33), (96, 40)]}


def tiny_vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    return vae.eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, sizes in SIZES.items():
        (root / c).mkdir()
        for k, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{k}.png")
    (root / "cat" / "readme.txt").write_text("ignored")
    return root


@pytest.fixture(scope="module")
def extracted(vae, image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "feat"
    meta = extract_features(
        image_root, out, vae, image_size=32, batch_size=3, shard_size=4, vae_id=VAE_ID,
        latent_scale=SCALE, dtype="float32", progress=False,
    )
    return out, meta


def expected_files(image_root):
    return [(image_root / c / f"img{k}.png", i) for i, c in enumerate(sorted(SIZES)) for k in range(len(SIZES[c]))]


def online_posterior(vae, path, flip):
    img = center_crop_arr(Image.open(path).convert("RGB"), 32)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        d = vae.encode(x[None]).latent_dist
    return d.mean[0], d.std[0]


def test_meta_and_shards(extracted):
    out, meta = extracted
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta == read_latent_meta(out)
    assert meta["vae_id"] == VAE_ID and meta["latent_scale"] == SCALE
    assert meta["image_size"] == 32 and meta["latent_shape"] == [4, 16, 16]
    assert meta["num_images"] == 6 and meta["num_classes"] == 2 and meta["classes"] == ["cat", "dog"]
    assert meta["dtype"] == "float32" and meta["format_version"] == 1
    assert [s["num_images"] for s in meta["shards"]] == [4, 2]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors"]  # no tmp/state left
    sh = load_file(str(out / "shard_00000.safetensors"))
    assert sh["mean"].shape == (4, 2, 4, 16, 16) and sh["std"].shape == (4, 2, 4, 16, 16)
    assert sh["mean"].dtype == torch.float32 and sh["labels"].dtype == torch.int64


def test_stored_posterior_equals_online_encoding(extracted, vae, image_root):
    out, meta = extracted
    shards = [load_file(str(out / s["file"])) for s in meta["shards"]]
    mean = torch.cat([s["mean"] for s in shards])
    std = torch.cat([s["std"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards])
    files = expected_files(image_root)
    assert labels.tolist() == [lab for _, lab in files] == [0, 0, 0, 1, 1, 1]
    for i, (path, _) in enumerate(files):
        for f in (0, 1):
            m, s = online_posterior(vae, path, flip=bool(f))
            assert torch.allclose(mean[i, f], m, atol=2e-5, rtol=1e-4)
            assert torch.allclose(std[i, f], s, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(mean[i, 0], mean[i, 1], atol=1e-3)  # the flip really differs


def test_float16_storage(vae, image_root, tmp_path, extracted):
    meta = extract_features(image_root, tmp_path / "f16", vae, image_size=32, shard_size=10, vae_id=VAE_ID,
                            progress=False)
    assert meta["dtype"] == "float16" and meta["latent_scale"] == 0.18215 and len(meta["shards"]) == 1
    sh = load_file(str(tmp_path / "f16" / "shard_00000.safetensors"))
    ref = torch.cat([load_file(str(extracted[0] / s["file"]))["mean"] for s in extracted[1]["shards"]])
    assert sh["mean"].dtype == torch.float16
    assert torch.allclose(sh["mean"].float(), ref, atol=1e-3, rtol=1e-3)


def test_latent_dataset_fresh_samples_and_moments(extracted):
    out, _ = extracted
    ds = LatentDataset(out, flip=False)
    assert len(ds) == 6 and ds.latent_shape == (4, 16, 16) and ds.num_classes == 2
    mean, std, _ = ds.posterior(4)
    z1, y1 = ds[4]
    z2, _ = ds[4]
    assert z1.shape == (4, 16, 16) and z1.dtype == torch.float32 and y1.dtype == torch.long and int(y1) == 1
    assert not torch.allclose(z1, z2)
    n = 1500
    draws = torch.stack([ds[4][0] for _ in range(n)])
    emp_mean, emp_std = draws.mean(0), draws.std(0)
    # flip=False: centred on index 0 (the unflipped posterior), spread latent_scale * std
    tol = 5 * SCALE * std[0] / n ** 0.5
    assert torch.all((emp_mean - SCALE * mean[0]).abs() < tol)
    ratio = emp_std / (SCALE * std[0])
    assert abs(ratio.median().item() - 1) < 0.03 and ratio.min() > 0.8 and ratio.max() < 1.2
    # flip=True: the average is over both posteriors
    ds_f = LatentDataset(out, flip=True)
    draws = torch.stack([ds_f[4][0] for _ in range(n)])
    mix = SCALE * (mean[0] + mean[1]) / 2
    spread = SCALE * (std.max() + (mean[0] - mean[1]).abs().max())
    assert (draws.mean(0) - mix).abs().max() < 5 * spread / n ** 0.5
    assert (draws.mean(0) - SCALE * mean[0]).abs().max() > (draws.mean(0) - mix).abs().max()


def test_labels_generator_in_memory_and_pickle(extracted):
    out, _ = extracted
    a = LatentDataset(out, generator=torch.Generator().manual_seed(3))
    b = LatentDataset(out, generator=torch.Generator().manual_seed(3), in_memory=True)
    assert a.labels.tolist() == b.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        za, ya = a[i]
        zb, yb = b[i]
        assert torch.equal(za, zb) and int(ya) == int(yb) == a.labels[i]
    c = pickle.loads(pickle.dumps(a))  # open file handles are not pickled
    assert torch.equal(c.posterior(5)[0], a.posterior(5)[0])
    assert int(a[-1][1]) == 1
    with pytest.raises(IndexError):
        a[6]
    assert isinstance(build_dataset("latents", root=out), LatentDataset)


def write_handmade(root, mean, labels, scale=2.0):
    """A latent folder written by hand in the documented format, with std = 0 (no noise)."""
    root.mkdir(parents=True)
    save_file({"mean": mean, "std": torch.zeros_like(mean), "labels": labels}, str(root / "shard_00000.safetensors"))
    meta = {"format_version": 1, "vae_id": "hand", "latent_scale": scale, "image_size": 8,
            "latent_shape": list(mean.shape[2:]), "num_images": mean.shape[0], "num_classes": 3,
            "classes": ["a", "b", "c"], "shards": [{"file": "shard_00000.safetensors", "num_images": mean.shape[0]}],
            "dtype": "float32"}
    (root / "meta.json").write_text(json.dumps(meta))


def test_flip_choice_on_handmade_folder(tmp_path):
    mean = torch.zeros(3, 2, 1, 2, 2)
    mean[:, 0] = 1.0  # unflipped posterior: ones
    mean[:, 1] = -1.0  # flipped posterior: minus ones
    write_handmade(tmp_path / "h", mean, torch.tensor([2, 0, 1]))
    no_flip = LatentDataset(tmp_path / "h", flip=False)
    assert all(torch.equal(no_flip[i % 3][0], torch.full((1, 2, 2), 2.0)) for i in range(60))
    assert [int(no_flip[i][1]) for i in range(3)] == [2, 0, 1]
    torch.manual_seed(0)  # global RNG
    fl = LatentDataset(tmp_path / "h", flip=True)
    vals = [fl[1][0] for _ in range(400)]
    n_flip = sum(torch.equal(v, torch.full((1, 2, 2), -2.0)) for v in vals)
    n_orig = sum(torch.equal(v, torch.full((1, 2, 2), 2.0)) for v in vals)
    assert n_flip + n_orig == 400 and 150 < n_flip < 250
    assert LatentDataset(tmp_path / "h", latent_scale=1.0, flip=False)[0][0].max().item() == 1.0


def test_check_latent_meta(extracted):
    _, meta = extracted
    assert check_latent_meta(meta, vae_id=VAE_ID, latent_scale=SCALE) is meta
    check_latent_meta(meta)  # nothing to check
    check_latent_meta(meta, latent_scale=SCALE * (1 + 1e-9))
    with pytest.raises(ValueError) as e:
        check_latent_meta(meta, vae_id="stabilityai/sd-vae-ft-ema")
    assert VAE_ID in str(e.value) and "stabilityai/sd-vae-ft-ema" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_latent_meta(meta, vae_id=VAE_ID, latent_scale=0.18215)
    assert "0.5" in str(e.value) and "0.18215" in str(e.value)


def test_missing_or_invalid_folder(tmp_path):
    for fn in (read_latent_meta, LatentDataset, lambda p: build_dataset("latents", root=p)):
        with pytest.raises(FileNotFoundError) as e:
            fn(tmp_path / "nope")
        assert "nope" in str(e.value) and "dcdit extract-features" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        read_latent_meta(tmp_path / "empty")
    assert "meta.json" in str(e.value) and "dcdit extract-features" in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="extract-features"):
        read_latent_meta(tmp_path / "bad")
    (tmp_path / "bad" / "meta.json").write_text(json.dumps({"vae_id": "x"}))
    with pytest.raises(ValueError, match="latent_scale"):
        read_latent_meta(tmp_path / "bad")
    write_handmade(tmp_path / "h", torch.zeros(2, 2, 1, 2, 2), torch.tensor([0, 1]))
    (tmp_path / "h" / "shard_00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00000"):
        LatentDataset(tmp_path / "h")


class CountingVAE(torch.nn.Module):
    """Wraps the VAE, counts encode calls and optionally fails on a given call (a simulated crash)."""

    def __init__(self, vae, fail_at=None):
        super().__init__()
        self.vae, self.calls, self.fail_at = vae, 0, fail_at

    def encode(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.vae.encode(x)


def test_resume_rerun_and_settings_change(vae, image_root, extracted, tmp_path):
    out = tmp_path / "r"
    kw = dict(image_size=32, batch_size=2, shard_size=4, vae_id=VAE_ID, latent_scale=SCALE, dtype="float32",
              progress=False)
    crashing = CountingVAE(vae, fail_at=3)  # shard 0 = calls 1, 2; crash inside shard 1
    with pytest.raises(RuntimeError, match="simulated"):
        extract_features(image_root, out, crashing, **kw)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["extract_state.json", "shard_00000.safetensors"]  # atomic: no partial shard
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_latent_meta(out)
    counting = CountingVAE(vae)
    meta = extract_features(image_root, out, counting, **kw)
    assert counting.calls == 1  # only shard 1 (2 images) was encoded again
    ref = extracted[0]
    for s in ("shard_00000.safetensors", "shard_00001.safetensors"):
        a, b = load_file(str(out / s)), load_file(str(ref / s))
        assert torch.allclose(a["mean"], b["mean"], atol=1e-5) and torch.equal(a["labels"], b["labels"])
    # a finished extraction with identical settings is returned without re-encoding
    counting = CountingVAE(vae)
    assert extract_features(image_root, out, counting, **kw) == meta and counting.calls == 0
    # other settings: refused unless overwrite=True
    kw2 = dict(kw, vae_id="other/vae")
    with pytest.raises(ValueError, match="other/vae"):
        extract_features(image_root, out, vae, **kw2)
    meta2 = extract_features(image_root, out, vae, overwrite=True, **kw2)
    assert meta2["vae_id"] == "other/vae" and read_latent_meta(out)["vae_id"] == "other/vae"


# --------------------------------------------------------------------------------------------------
# unreadable images (issue 18): skipped and reported, or with strict=True a stop naming the file
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def messy_root(tmp_path_factory, image_root):
    """The six images of ``image_root`` plus a truncated PNG (cat, between img1 and img2) and a text
    file named like a JPEG (dog, last): ImageFolder indices 2 and 7 are unreadable."""
    import shutil

    root = tmp_path_factory.mktemp("messy")
    for c in SIZES:
        shutil.copytree(image_root / c, root / c)
    png = (image_root / "cat" / "img2.png").read_bytes()
    (root / "cat" / "img1b.png").write_bytes(png[: len(png) // 2])
    (root / "dog" / "notes.jpg").write_text("meeting notes, not a photo")
    return root


BAD = {2: "img1b.png", 7: "notes.jpg"}


def test_unreadable_images_are_skipped_and_reported(vae, messy_root, extracted, tmp_path):
    """The six readable images are stored exactly as a clean extraction stores them; the two bad files
    are listed (with PIL's reason) in skipped_images.json and counted in meta.json."""
    from dcdit.errors import DcditWarning

    with pytest.warns(DcditWarning) as caught:
        meta = extract_features(messy_root, tmp_path / "f", vae, image_size=32, batch_size=3, shard_size=4, vae_id=VAE_ID,
                                latent_scale=SCALE, dtype="float32", progress=False)
    assert sorted(w.message.args[0].split()[3].split("/")[-1] for w in caught) == sorted(BAD.values())
    assert (meta["num_images"], meta["num_source_images"], meta["num_skipped"]) == (6, 8, 2)
    report = json.loads((tmp_path / "f" / "skipped_images.json").read_text())
    assert report["count"] == 2 and [Path(s["path"]).name for s in report["images"]] == ["img1b.png", "notes.jpg"]
    assert all(s["error"] for s in report["images"])
    ref = LatentDataset(extracted[0], flip=False)
    ds = LatentDataset(tmp_path / "f", flip=False)
    assert ds.labels.tolist() == ref.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        torch.testing.assert_close(ds.posterior(i)[0], ref.posterior(i)[0], atol=1e-5, rtol=1e-4)


def test_strict_stops_at_the_bad_image_and_keeps_finished_shards(vae, messy_root, tmp_path):
    from dcdit.errors import UnreadableImageError

    out = tmp_path / "f"
    kw = dict(image_size=32, batch_size=2, shard_size=2, vae_id=VAE_ID, latent_scale=SCALE, dtype="float32", progress=False)
    with pytest.raises(UnreadableImageError) as e:
        extract_features(messy_root, out, vae, strict=True, **kw)
    assert str(messy_root / "cat" / "img1b.png") in str(e.value) and "--strict" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["extract_state.json", "shard_00000.safetensors"]
    first = load_file(str(out / "shard_00000.safetensors"))
    counting = CountingVAE(vae)  # without strict the run resumes: shard 0 is kept, shards 1-3 are encoded
    with pytest.warns(Warning):
        meta = extract_features(messy_root, out, counting, **kw)
    assert counting.calls == 3 and meta["num_images"] == 6 and meta["num_skipped"] == 2
    assert torch.equal(load_file(str(out / "shard_00000.safetensors"))["mean"], first["mean"])


def test_a_shard_of_only_unreadable_images(vae, messy_root, tmp_path):
    """shard_size=1: shards 2 and 7 hold nothing; meta.json lists the six others, a rerun encodes nothing."""
    kw = dict(image_size=32, batch_size=1, shard_size=1, vae_id=VAE_ID, latent_scale=SCALE, dtype="float32", progress=False)
    with pytest.warns(Warning):
        meta = extract_features(messy_root, tmp_path / "f", vae, **kw)
    assert [s["file"] for s in meta["shards"]] == [f"shard_{i:05d}.safetensors" for i in range(8) if i not in BAD]
    ds = LatentDataset(tmp_path / "f")
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    counting = CountingVAE(vae)
    assert extract_features(messy_root, tmp_path / "f", counting, **kw) == meta and counting.calls == 0


def test_extractions_from_before_skipping_are_still_resumed(vae, image_root, tmp_path):
    """Shards without source_range metadata and meta.json without num_source_images (older dcdit)."""
    from safetensors import safe_open

    out = tmp_path / "f"
    kw = dict(image_size=32, batch_size=2, shard_size=4, vae_id=VAE_ID, latent_scale=SCALE, dtype="float32", progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        extract_features(image_root, out, CountingVAE(vae, fail_at=3), **kw)
    path = out / "shard_00000.safetensors"
    with safe_open(str(path), framework="pt") as f:
        old_meta = {k: v for k, v in f.metadata().items() if k not in ("source_range", "skipped")}
    save_file(load_file(str(path)), str(path), metadata=old_meta)
    state = json.loads((out / "extract_state.json").read_text())
    state["num_images"] = state.pop("num_source_images")
    (out / "extract_state.json").write_text(json.dumps(state))
    counting = CountingVAE(vae)
    meta = extract_features(image_root, out, counting, **kw)
    assert counting.calls == 1 and meta["num_images"] == 6  # only shard 1 encoded again
    for key in ("num_source_images", "num_skipped"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    counting = CountingVAE(vae)
    extract_features(image_root, out, counting, **kw)
    assert counting.calls == 0  # a finished older extraction with the same settings is kept as is


def test_damaged_shard_is_named(extracted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(extracted[0], copy)
    shard = copy / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    for in_memory in (False, True):
        with pytest.raises(ValueError, match=r"latent shard .*shard_00001.safetensors is unreadable.*extract-features"):
            LatentDataset(copy, in_memory=in_memory)


def test_cli_skips_or_stops_with_strict(vae, messy_root, tmp_path, capsys):
    from dcdit.cli import main

    vae.save_pretrained(tmp_path / "vae")
    args = ["extract-features", "--images", str(messy_root), "--vae", str(tmp_path / "vae"), "--image-size", "32",
            "--batch-size", "4", "--shard-size", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img1b.png" in err[0] and err[0].startswith("dcdit extract-features: error: cannot read image")
    assert main([*args, "--out", str(tmp_path / "skip")]) == 0
    captured = capsys.readouterr()
    assert f"skipped 2 unreadable image(s), listed in {tmp_path / 'skip' / 'skipped_images.json'}" in captured.out
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("dcdit: warning: skipped unreadable image") for w in warnings)
