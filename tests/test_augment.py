"""Tests for vitboost.augment (CPU; the same code paths run on CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitboost.augment as augment
from vitboost.augment import AugmentConfig, GpuAugment, soft_cross_entropy

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
K = 5
# CUDA runs the sync-free code path; CI has no GPU, so those cases skip there.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))]


def _batch(b: int = 8, h: int = 32, w: int = 32, seed: int = 0,
           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, K, (b,), generator=g)
    return images.to(device), labels.to(device)


def _plain(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _aug(cfg: AugmentConfig, seed: int = 0, num_classes: int = K) -> GpuAugment:
    return GpuAugment(cfg, num_classes=num_classes, mean=MEAN, std=STD, seed=seed)


@pytest.mark.parametrize("preset", ["none", "light", "strong"])
@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_and_dtypes(preset: str, hw: tuple[int, int], device: str) -> None:
    images, labels = _batch(8, *hw, device=device)
    cfg = AugmentConfig.preset(preset)
    x, y = _aug(cfg)(images, labels)
    assert x.shape == images.shape and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if cfg.soft_targets:
        assert y.shape == (8, K) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(1), torch.ones(8, device=device))
        assert (y >= 0).all()
    else:
        assert y.dtype == torch.int64 and torch.equal(y, labels)


@pytest.mark.parametrize("device", DEVICES)
def test_preset_none_is_plain_normalization(device: str) -> None:
    images, labels = _batch(device=device)
    aug = _aug(AugmentConfig.preset("none"))
    x, y = aug(images, labels)
    assert torch.equal(x, _plain(images))
    assert torch.equal(x, aug.normalize(images))
    assert torch.equal(y, labels)


def test_presets_and_config() -> None:
    strong = AugmentConfig.preset("strong")
    assert strong.mixes and strong.soft_targets and strong.randaug_n == 2
    assert not AugmentConfig.preset("light").mixes
    assert AugmentConfig(label_smoothing=0.1).soft_targets
    assert not AugmentConfig(mixup_alpha=0.8, mix_prob=0.0).mixes
    with pytest.raises(ValueError):
        AugmentConfig.preset("nope")
    with pytest.raises(ValueError):
        AugmentConfig(scale=(0.9, 0.1))
    with pytest.raises(TypeError):
        _aug(strong)(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_determinism_and_seed(device: str) -> None:
    images, labels = _batch(16, device=device)
    cfg = AugmentConfig.preset("strong")
    a1, b1 = _aug(cfg, seed=1)(images, labels)
    a2, b2 = _aug(cfg, seed=1)(images, labels)
    a3, _ = _aug(cfg, seed=2)(images, labels)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, a3)


@pytest.mark.parametrize("device", DEVICES)
def test_generator_state_round_trip(device: str) -> None:
    images, labels = _batch(16, device=device)
    cfg = AugmentConfig.preset("strong")
    aug = _aug(cfg, seed=3)
    aug(images, labels)                        # advance the stream
    state = aug.state_dict()
    want_x, want_y = aug(images, labels)
    resumed = _aug(cfg, seed=99)               # seed comes from the state
    resumed.load_state_dict(state)
    got_x, got_y = resumed(images, labels)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    fresh = _aug(cfg, seed=3)
    fresh.load_state_dict(_aug(cfg, seed=3).state_dict())  # never-called state: fresh stream
    torch.testing.assert_close(fresh(images, labels)[0], _aug(cfg, seed=3)(images, labels)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_lambda_consistency(device: str) -> None:
    b = 8
    images, _ = _batch(b, device=device)
    labels = torch.arange(b, device=device)    # distinct classes: lam readable from targets
    cfg = AugmentConfig.preset("none").with_(mixup_alpha=0.8)
    lams = set()
    for seed in range(4):
        aug = _aug(cfg, seed=seed, num_classes=b)
        x, y = aug(images, labels)
        torch.testing.assert_close(y.sum(1), torch.ones(b, device=device))
        lam = y[0, 0]
        torch.testing.assert_close(y.diagonal(), lam.expand(b))
        torch.testing.assert_close(y.flip(0).diagonal(), (1 - lam).expand(b))
        plain = _plain(images)
        torch.testing.assert_close(x, lam * plain + (1 - lam) * plain.flip(0))
        lams.add(round(lam.item(), 4))
    assert len(lams) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_area_corrected_lambda(device: str) -> None:
    b = 6
    images, _ = _batch(b, device=device)
    labels = torch.arange(b, device=device)
    cfg = AugmentConfig.preset("none").with_(cutmix_alpha=1.0, label_smoothing=0.1)
    lams = []
    for seed in range(4):
        x, y = _aug(cfg, seed=seed, num_classes=b)(images, labels)
        torch.testing.assert_close(y.sum(1), torch.ones(b, device=device))
        plain = _plain(images)
        kept = (x == plain).all(dim=1).float().mean((1, 2))   # fraction of own pixels
        # smoothed one-hot: on = 1 - s + s/K, off = s/K; target = off + (on - off) * lam
        off = 0.1 / b
        lam = (y.diagonal() - off) / (1 - 0.1)
        torch.testing.assert_close(lam, kept, atol=1e-5, rtol=0)
        swapped = (x == plain.flip(0)).all(dim=1)
        assert ((x == plain).all(dim=1) | swapped).all()       # every pixel from one of the pair
        lams.append(lam[0].item())
    assert min(lams) < 0.99                                     # some box was actually cut


def test_label_smoothing_only_targets() -> None:
    images, labels = _batch()
    _, y = _aug(AugmentConfig.preset("none").with_(label_smoothing=0.2))(images, labels)
    want = F.one_hot(labels, K).float() * 0.8 + 0.2 / K
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("device", DEVICES)
def test_hflip_only_is_exact_flip(device: str) -> None:
    images, labels = _batch(32, device=device)
    x, _ = _aug(AugmentConfig.preset("none").with_(hflip=0.5))(images, labels)
    plain = _plain(images)
    same = (x == plain).flatten(1).all(1)
    flipped = (x == torch.flip(plain, dims=[3])).flatten(1).all(1)
    assert (same | flipped).all()
    assert same.any() and flipped.any()


@pytest.mark.parametrize("device", DEVICES)
def test_full_crop_is_identity(device: str) -> None:
    images, labels = _batch(device=device)
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    torch.testing.assert_close(_aug(cfg)(images, labels)[0], _plain(images))
    # force the resampling path: a crop that can only be the whole image
    warp = cfg.with_(scale=(0.9999, 1.0))
    x, _ = _aug(warp)(images, labels)
    torch.testing.assert_close(x, _plain(images), atol=1e-4, rtol=0)


def test_crop_and_geometry_stay_in_image() -> None:
    """A constant image stays constant under crop/flip (no padding leaks in)."""
    images = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    cfg = AugmentConfig(scale=(0.08, 1.0), hflip=0.5, vflip=0.5)
    x, _ = _aug(cfg)(images, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(x, _plain(images))


def test_small_crop_is_a_zoom() -> None:
    """A crop of a horizontal ramp is still a monotone ramp, steeper than the original."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    images = ramp.view(1, 1, 1, 64).expand(4, 3, 64, 64).contiguous()
    cfg = AugmentConfig(scale=(0.1, 0.3), ratio=(1.0, 1.0), hflip=0.0)
    x, _ = _aug(cfg)(images, torch.zeros(4, dtype=torch.long))
    row = x[:, 0, 32]
    assert (row.diff(dim=1) >= -1e-5).all()
    span = row[:, -1] - row[:, 0]
    full = _plain(images)[0, 0, 32]
    assert (span < 0.7 * (full[-1] - full[0])).all()


@pytest.mark.parametrize("device", DEVICES)
def test_randaug_stays_in_range(device: str) -> None:
    images, labels = _batch(64, device=device)
    cfg = AugmentConfig(scale=(0.08, 1.0), randaug_n=3, randaug_m=10.0, color_jitter=0.4, rotate=15.0)
    x, _ = _aug(cfg)(images, labels)
    unnorm = (x * torch.tensor(STD, device=device).view(1, 3, 1, 1)
              + torch.tensor(MEAN, device=device).view(1, 3, 1, 1))
    assert unnorm.min() >= -1e-5 and unnorm.max() <= 1 + 1e-5


def test_randaug_colour_ops_follow_their_draws() -> None:
    """Each sample gets exactly the op it drew, at timm's magnitude for m=9."""
    images, labels = _batch(96)
    cfg = AugmentConfig(scale=(1.0, 1.0), hflip=0.0, randaug_n=1, randaug_m=9.0,
                        randaug_mstd=0.0, randaug_p=1.0)
    ra = _aug(cfg, seed=4)._draw_randaug(96)     # the first draws of a call
    x, _ = _aug(cfg, seed=4)(images, labels)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    got, src = x * std + mean, images.float() / 255
    lv = 0.9
    expected = {  # timm rand-m9 'Increasing' ops at level 0.9
        "AutoContrast": lambda t, s: augment._autocontrast(t),
        "Equalize": lambda t, s: augment._equalize(t),
        "Invert": lambda t, s: 1 - t,
        "Posterize": lambda t, s: augment._posterize(t, torch.tensor([4.0 - int(4 * lv)])),
        "Solarize": lambda t, s: augment._solarize(t, torch.tensor([(256 - int(256 * lv)) / 255])),
        "SolarizeAdd": lambda t, s: augment._solarize_add(t, torch.tensor([int(110 * lv) / 255])),
        "Color": lambda t, s: augment._saturation(t, torch.tensor([1 + s * lv * 0.9])),
        "Contrast": lambda t, s: augment._contrast(t, torch.tensor([1 + s * lv * 0.9])),
        "Brightness": lambda t, s: augment._brightness(t, torch.tensor([1 + s * lv * 0.9])),
        "Sharpness": lambda t, s: augment._sharpness(t, torch.tensor([1 + s * lv * 0.9])),
    }
    seen = set()
    for i in range(96):
        name = augment.RANDAUG_OPS[ra["op"][i, 0]]
        if name not in expected:   # geometric: moved, so not equal to the source
            assert not torch.allclose(got[i], src[i], atol=1e-3)
            continue
        want = expected[name](src[i:i + 1], ra["sign"][i, 0].item())[0]
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0, msg=name)
        seen.add(name)
    assert len(seen) == len(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_random_erase_pixels(device: str) -> None:
    images, labels = _batch(16, device=device)
    x, _ = _aug(AugmentConfig.preset("none").with_(random_erase=1.0))(images, labels)
    changed = (x != _plain(images)).any(dim=1).float().mean((1, 2))
    assert (changed > 0.01).all() and (changed < 0.4).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu() -> None:
    """Parameters come from the host generator, so CPU and CUDA augment alike."""
    images, labels = _batch(32, h=48, w=48)
    cfg = AugmentConfig.preset("strong").with_(random_erase=0.0, color_jitter=0.3, rotate=10.0)
    x_cpu, y_cpu = _aug(cfg, seed=7)(images, labels)
    x_gpu, y_gpu = _aug(cfg, seed=7)(images.cuda(), labels.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    # float differences may flip a rounding inside posterize/equalize/solarize
    off = ((x_gpu.cpu() - x_cpu).abs() > 1e-3).float().mean().item()
    assert off < 1e-3, off


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_call_never_syncs() -> None:
    """The training loop must not stall on augmentation: no host syncs on CUDA."""
    images, labels = _batch(16, device="cuda")
    cfg = AugmentConfig.preset("strong").with_(color_jitter=0.4, rotate=10.0, vflip=0.1)
    aug = _aug(cfg)
    aug(images, labels)                        # first call may allocate/copy constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            aug(images, labels)
            aug(images, labels, groups=4)          # a chunk of 4 batches (vitboost.batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_affine_grid_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.eye(3).repeat(4, 1, 1)
    m[:, :2] += 0.3 * torch.randn(4, 2, 3, generator=g)
    H, W = 12, 20
    theta = augment._theta(m, H, W)
    want = F.affine_grid(theta, [4, 3, H, W], align_corners=False)
    torch.testing.assert_close(augment._affine_grid(theta, H, W), want, atol=1e-5, rtol=0)
    # pixel-centred translation by one pixel moves the grid by one pixel (2 / W)
    shift = torch.eye(3).unsqueeze(0)
    shift[0, 0, 2] = 1.0
    d = augment._affine_grid(augment._theta(shift, H, W), H, W) - F.affine_grid(
        torch.eye(3)[:2].unsqueeze(0), [1, 3, H, W], align_corners=False)
    torch.testing.assert_close(d[..., 0], torch.full((1, H, W), 2 / W))


def test_color_ops_match_pil() -> None:
    """Colour ops agree with the PIL ops RandAugment uses, to within 1.5 grey levels (PIL rounds to uint8)."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(20, 220, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    u8[1] = u8[1] // 3 + 60                     # low contrast: autocontrast/equalize matter
    x = u8.float() / 255
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in u8]
    f = torch.tensor([0.3, 0.8, 1.4, 1.9])

    def from_pil(ims: list) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in ims]).float() / 255

    cases = {
        "autocontrast": (augment._autocontrast(x), [ImageOps.autocontrast(im) for im in pil]),
        "equalize": (augment._equalize(x), [ImageOps.equalize(im) for im in pil]),
        "posterize": (augment._posterize(x, torch.tensor([1.0, 2.0, 3.0, 4.0])),
                      [ImageOps.posterize(im, b) for im, b in zip(pil, [1, 2, 3, 4])]),
        "solarize": (augment._solarize(x, torch.tensor([26.0, 90.0, 128.0, 200.0]) / 255),
                     [ImageOps.solarize(im, t) for im, t in zip(pil, [26, 90, 128, 200])]),
        "brightness": (augment._brightness(x, f),
                       [ImageEnhance.Brightness(im).enhance(v) for im, v in zip(pil, f.tolist())]),
        "color": (augment._saturation(x, f),
                  [ImageEnhance.Color(im).enhance(v) for im, v in zip(pil, f.tolist())]),
        "contrast": (augment._contrast(x, f),
                     [ImageEnhance.Contrast(im).enhance(v) for im, v in zip(pil, f.tolist())]),
        "sharpness": (augment._sharpness(x, f),
                      [ImageEnhance.Sharpness(im).enhance(v) for im, v in zip(pil, f.tolist())]),
    }
    for name, (ours, ref) in cases.items():
        err = (ours - from_pil(ref)).abs().max().item() * 255
        assert err <= 1.5, f"{name}: off by {err:.2f} grey levels"


def test_soft_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, K, generator=g)
    labels = torch.randint(0, K, (10,), generator=g)
    torch.testing.assert_close(soft_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    one_hot = F.one_hot(labels, K).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    _, y = _aug(AugmentConfig.preset("none").with_(label_smoothing=0.1))(images, labels)
    torch.testing.assert_close(soft_cross_entropy(logits, y),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_kornia_comparison_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/augment_kornia.py (run on a GPU by hand): every pipeline gets a row with its speed,
    host cost, resumability and the overhead on a training step; kornia soft targets are distributions."""
    pytest.importorskip("kornia")
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "augment_kornia.py"
    spec = importlib.util.spec_from_file_location("augment_kornia", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["speed", "--device", "cpu", "--batch", "4", "--size", "32", "--model", "vit-micro",
                       "--iters", "1", "--windows", "1", "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pipeline"] for r in rows] == ["vitboost", "kornia", "kornia_slice_crop"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["resumable"] is True
    aug = bench.KorniaAugment(AugmentConfig.preset("strong"), K, MEAN, STD, seed=0)
    images, labels = _batch()
    x, y = aug(images, labels)
    assert x.shape == images.shape and x.dtype == torch.float32
    assert y.shape == (8, K) and torch.allclose(y.sum(1), torch.ones(8)) and (y >= 0).all()
