"""control.py: Canny against OpenCV; ControlNet and T2I-Adapter: zero init, gradients only to the adapter, cached
controls."""
import io
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, make_controls, make_folder, randomize
from PIL import Image

import control
import data
from model import build_model


def decoded_test_images():
    """Real decoded images: a photograph (a JPEG), and the built-in shapes through a JPEG round trip, as uint8 CHW."""
    photo = np.asarray(Image.open(os.path.join(ROOT, "tests", "fixtures", "grace_hopper.jpg")).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(data.SyntheticShapes(12, 64, 0).images_uint8()), axis=1)).save(buffer, "JPEG")
    shapes = np.asarray(Image.open(buffer).convert("RGB"))
    return [photo, photo[:, :, :1], shapes]


@pytest.mark.slow
def test_canny_matches_opencv_on_decoded_images():
    cv2 = pytest.importorskip("cv2")
    for image in decoded_test_images():
        ours = control.canny(torch.from_numpy(image.copy()).permute(2, 0, 1))[0].numpy()
        reference = cv2.Canny(np.ascontiguousarray(image), 100, 200)  # the paper's thresholds
        assert 0.02 < (reference > 0).mean() < 0.2  # edges to find, not a blank image
        assert (ours == reference).mean() >= 0.99  # measured: 1.0 (every pixel) on all three
        blurred = control.canny(torch.from_numpy(image.copy()).permute(2, 0, 1), sigma=1.0)[0].numpy()
        reference = cv2.Canny(cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), 1.0), 100, 200)
        assert (blurred == reference).mean() >= 0.99  # measured: 99.97% on the photograph


ADAPTED = [("LDM-S", "controlnet", 1), ("LDM-S", "t2i", 4), ("DiT-Ti/4", "controlnet", 1),
           ("DiT-Ti/2", "controlnet", 2)]


def adapted_model(name, kind, downsample, size=8):
    torch.manual_seed(0)
    base = randomize(build_model(name, size, in_channels=3, num_classes=5), std=0.05)
    return base, control.adapt(base, kind, downsample).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,downsample", ADAPTED)
def test_zero_initialised_adapter_leaves_the_frozen_model_unchanged_exactly(name, kind, downsample):
    base, model = adapted_model(name, kind, downsample)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 5])  # 5: the null class
    hint = torch.rand(3, 3, 8 * downsample, 8 * downsample)
    with torch.no_grad():
        assert base(x, t, y).abs().mean() > 0.01
        assert torch.equal(model(x, t, y, hint), base(x, t, y))
        assert torch.equal(model.forward_with_cfg(x, t, y, 3.0, hint=hint), base.forward_with_cfg(x, t, y, 3.0))


@pytest.mark.parametrize("name,kind,downsample", ADAPTED)
def test_gradients_reach_only_the_adapter_and_then_the_control_matters(name, kind, downsample):
    base, model = adapted_model(name, kind, downsample)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.adapter.parameters()}
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 4])
    hint = torch.rand(3, 3, 8 * downsample, 8 * downsample)
    for _ in range(3):  # a step through each zero layer: the zero linears, then the hint encoder's last conv
        opt.zero_grad()
        model(x, t, y, hint).square().mean().backward()
        opt.step()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    with torch.no_grad():
        assert not torch.equal(model(x, t, y, hint), model(x, t, y, torch.rand_like(hint)))


def test_an_adapter_with_no_place_in_the_model_is_an_error():
    with pytest.raises(ValueError, match="DiT, which has none: use adapter=controlnet"):
        control.adapt(build_model("DiT-Ti/4", 8, in_channels=3, num_classes=5), "t2i", 1)
    with pytest.raises(ValueError, match="power of 2"):
        control.adapt(build_model("LDM-S", 8, in_channels=3, num_classes=5), "controlnet", 3)


def test_cached_controls_are_computed_once_keyed_by_content_and_read_back_identical(tmp_path, monkeypatch):
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 3)
    make_controls(tmp_path / "images", tmp_path / "controls")
    folder = data.ImageFolder(str(tmp_path / "images"), 16, flip=False, controls=str(tmp_path / "controls"))
    cases = [(data.SyntheticShapes(40, 16, 0), "canny"), (data.SyntheticShapes(40, 16, 0, masks=True), "mask"),
             (folder, str(tmp_path / "controls"))]
    first = [np.array(control.cached_controls(ds, kind, str(tmp_path / "cache"), batch_size=16)) for ds, kind in cases]
    for (ds, kind), cached in zip(cases, first):  # what adaptation computes per batch, to the 8 bits it came from
        images, _, *controls = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        fresh = control.control_image(kind, images, *controls)
        assert cached.dtype == np.uint8 and cached.shape == (len(ds), 1 if kind == "canny" else 3, 16, 16)
        assert np.array_equal(cached, fresh[:, :cached.shape[1]].mul(255).round().byte().numpy())
        assert 0 < cached.mean() < 255  # edges, shapes, inverted colours: not blank
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 3 and all(f.startswith("controls-") and f.endswith(".npy") for f in files)
    monkeypatch.setattr(control, "control_image", None)  # a second run reads the cache: nothing is computed
    for (ds, kind), cached in zip(cases, first):
        assert np.array_equal(control.cached_controls(ds, kind, str(tmp_path / "cache")), cached)
    assert sorted(os.listdir(tmp_path / "cache")) == files
    monkeypatch.undo()
    # other content or other settings: another key, computed anew
    os.utime(folder.controls[0], ns=(0, 0))
    control.cached_controls(folder, str(tmp_path / "controls"), str(tmp_path / "cache"))
    control.cached_controls(data.SyntheticShapes(40, 16, 0, scale=0.6), "canny", str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 5
    with pytest.raises(ValueError, match="cached controls are of the unflipped images: set flip=False"):
        control.cached_controls(data.ImageFolder(str(tmp_path / "images"), 16), "canny", str(tmp_path / "cache"))


def test_two_runs_filling_one_control_cache_at_once_each_write_a_whole_file_of_their_own(tmp_path, monkeypatch):
    ds, compute, second = data.SyntheticShapes(40, 16, 0), control.control_image, []

    def another_run_midway(*args):  # at the first run's second batch, its temporary file half written
        if second == [None]:
            monkeypatch.setattr(control, "control_image", compute)
            second[0] = np.array(control.cached_controls(ds, "canny", str(tmp_path), batch_size=16))
        second.append(None)
        return compute(*args)
    monkeypatch.setattr(control, "control_image", another_run_midway)
    first = control.cached_controls(ds, "canny", str(tmp_path), batch_size=16)
    assert len(second) == 2 and np.array_equal(first, second[0]) and first.mean() > 0
    assert [f.endswith(".npy") for f in os.listdir(tmp_path)] == [True]
