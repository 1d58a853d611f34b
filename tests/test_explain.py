"""ferlab.explain: attribution maps (analytic answers), hooks, faithfulness, filters, feature maps, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ferlab.explain import METHODS, attribute
from ferlab.explain.faithfulness import deletion_insertion, ranks_from_heat
from ferlab.explain.filters import (
    AscentConfig,
    _channel_means,
    capture,
    check_layer,
    feature_maps,
    layer_output,
    list_layers,
    visualize_filters,
)
from ferlab.explain.methods import EXPLAINERS, baseline_value, get_explainer
from ferlab.models import FerModel, create_model
from ferlab.transforms import Normalizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- models with known answers
class LinearNet(FerModel):
    """logits = W x + b on the flattened 48x48 image (no spatial features)."""

    def __init__(self, k: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = k
        self.fc = nn.Linear(48 * 48, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, 48 * 48, generator=torch.Generator().manual_seed(seed)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, 2304)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)  # (B, K)


class GapNet(FerModel):
    """features = relu(x) (B, 1, 48, 48); logits = w * mean(features) + b, so Grad-CAM for c (w_c > 0) is relu(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0], [-1.0], [0.5]]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f.mean(dim=(2, 3)))


class SignedMapNet(FerModel):
    """features = nn.ReLU()(x) (B, 1, 48, 48); logit_c = mean(V[c] * features) with a fixed signed map V[c].

    Grad-CAM for c is relu(mean(V[c]) / HW * relu(x)); guided backpropagation passes only positive gradients
    through the ReLU module: relu(V[c] / HW) * (x > 0). Their product, guided Grad-CAM, is
    mean(V[c]) / HW^2 * relu(V[c]) * relu(x) where mean(V[c]) > 0, and 0 where mean(V[c]) < 0. The vanilla
    gradient, |V[c]| / HW * (x > 0), keeps the negative half of V[c] that guided backpropagation drops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)  # in place, as in the zoo's nets: the explainer must cope
        v = torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(1))
        v[0] += 0.5  # mean > 0: positive Grad-CAM weight
        v[1] -= 0.5  # mean < 0: no positive evidence
        self.register_buffer("v", v)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x.clone())  # (B, 1, 48, 48)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return (f[:, 0, None] * self.v).mean(dim=(2, 3))  # (B, 1, 48, 48) x (3, 48, 48) -> (B, 3)


class RegionNet(FerModel):
    """Class 0's logit grows with the mean of one fixed 12x16 region; everything else is ignored."""

    rows, cols = slice(12, 24), slice(16, 32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        s = f[:, 0, self.rows, self.cols].mean(dim=(1, 2)) * 4  # (B,)
        return torch.stack([s, -s, torch.zeros_like(s)], 1)


def no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
               for m in model.modules())


# ----------------------------------------------------------------------------- analytic answers
def test_methods_registry_matches_public_tuple():
    assert METHODS == tuple(EXPLAINERS)
    with pytest.raises(ValueError, match="unknown explanation method 'nope'.*saliency"):
        attribute(LinearNet(), torch.zeros(1, 1, 48, 48), "nope")


def test_saliency_of_linear_model_is_abs_weight():
    m = LinearNet().eval()
    x = torch.randn(3, 1, 48, 48)
    t = torch.tensor([0, 2, 1])
    raw = get_explainer("saliency", m)(x, t)  # (B, 48, 48)
    want = m.fc.weight.detach().abs()[t].view(3, 48, 48)
    torch.testing.assert_close(raw, want)
    heat = attribute(m, x, "saliency", target=t, clip_percent=0)
    torch.testing.assert_close(heat, want / want.flatten(1).amax(1)[:, None, None])


def test_smoothgrad_of_linear_model_is_abs_weight():
    m = LinearNet().eval()  # the gradient of a linear model is the same under any noise
    x = torch.randn(2, 1, 48, 48)
    t = torch.tensor([1, 2])
    raw = get_explainer("smoothgrad", m, samples=8)(x, t)  # (B, 48, 48)
    torch.testing.assert_close(raw, m.fc.weight.detach().abs()[t].view(2, 48, 48))


def test_integrated_gradients_of_linear_model_is_input_times_weight():
    m = LinearNet().eval()
    x = torch.randn(2, 1, 48, 48)
    raw = get_explainer("integrated-gradients", m, baseline=0.0)(x, torch.tensor([1, 1]))
    torch.testing.assert_close(raw, x[:, 0] * m.fc.weight.detach()[1].view(48, 48), atol=1e-4, rtol=1e-4)
    # a non-zero baseline b: (x - b) * W[c]
    raw_b = get_explainer("integrated-gradients", m, baseline=0.5)(x, torch.tensor([1, 1]))
    torch.testing.assert_close(raw_b, (x[:, 0] - 0.5) * m.fc.weight.detach()[1].view(48, 48), atol=1e-4, rtol=1e-4)
    # the heat map keeps the positive evidence only
    heat = attribute(m, x, "integrated-gradients", target=1, clip_percent=0)
    pos = raw.clamp_min(0)
    torch.testing.assert_close(heat, pos / pos.flatten(1).amax(1)[:, None, None], atol=1e-4, rtol=1e-4)


def test_gradcam_of_gap_model_is_rectified_feature_map():
    m = GapNet().eval()
    x = torch.randn(2, 1, 48, 48)
    heat = attribute(m, x, "gradcam", target=0, clip_percent=0)  # weight 2 > 0: cam = relu(2/HW * relu(x)) ∝ relu(x)
    want = x[:, 0].clamp_min(0)
    torch.testing.assert_close(heat, want / want.flatten(1).amax(1)[:, None, None], atol=1e-5, rtol=1e-4)
    assert float(attribute(m, x, "gradcam", target=1).max()) == 0.0  # negative weight: no positive evidence


def test_guided_gradcam_of_signed_map_model_is_known():
    m = SignedMapNet().eval()
    x = torch.randn(2, 1, 48, 48)
    hw = 48 * 48
    v0 = m.v[0]
    raw = get_explainer("guided-gradcam", m)(x, torch.tensor([0, 0]))  # (B, 48, 48)
    want = float(v0.mean()) / hw**2 * v0.clamp_min(0) * x[:, 0].clamp_min(0)
    torch.testing.assert_close(raw, want, atol=1e-9, rtol=1e-4)
    # guided, not vanilla: the pixels where V[0] < 0 (and x > 0) carry no attribution
    assert float(raw[(v0 < 0).expand_as(raw) & (x[:, 0] > 0)].abs().max()) == 0.0
    assert float(get_explainer("saliency", m)(x, torch.tensor([0, 0]))[(v0 < 0).expand_as(raw) & (x[:, 0] > 0)]
                 .min()) > 0.0
    # a class with a negative Grad-CAM weight has no positive evidence anywhere
    assert float(attribute(m, x, "guided-gradcam", target=1).max()) == 0.0
    assert m.act.inplace and no_hooks(m)  # the caller's model is left as found: hooks gone, ReLU still in place

def test_normalise_clips_outliers_at_a_percentile():
    raw = torch.rand(2, 48, 48) + 1.0  # values in [1, 2] ...
    raw[:, 0, 0] = 1000.0  # ... and one extreme pixel
    by_max = get_explainer("saliency", None, clip_percent=0).normalise(raw)
    clipped = get_explainer("saliency", None).normalise(raw)  # default: the 99th percentile maps to 1
    assert float(by_max[:, 1:].max()) < 0.01
    assert float(clipped.max()) == 1.0 and float(clipped[:, 1:].median()) > 0.5
    assert int((clipped == 1.0).sum()) >= 2 * 23  # the top 1% of 2304 pixels per image
    signed = get_explainer("integrated-gradients", None).normalise(-raw)
    assert float(signed.max()) == 0.0  # only negative evidence: an empty map, not a division by zero


def test_occlusion_only_marks_pixels_near_the_region_the_model_uses():
    m = RegionNet().eval()
    x = 1.0 + 0.1 * torch.randn(2, 1, 48, 48)
    heat = attribute(m, x, "occlusion", target=0, window=6, stride=3)
    inside = heat[:, 12:24, 16:32]
    assert float(inside.min()) > 0.3
    outside = heat.clone()
    outside[:, 12 - 6:24 + 6, 16 - 6:32 + 6] = 0  # a window can overlap the region from up to 5 pixels away
    assert float(outside.max()) == 0.0


@pytest.mark.parametrize("name", ["fer-resnet-s", "r002-vgg"])
def test_every_method_runs_on_cnns(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 1, 48, 48)
    fast = {"smoothgrad": {"samples": 4}, "integrated-gradients": {"steps": 8}, "occlusion": {"stride": 6}}
    for method in METHODS:
        heat = attribute(model, x, method, **fast.get(method, {}))
        assert heat.shape == (2, 48, 48), method
        assert heat.dtype == torch.float32 and heat.device.type == "cpu" and not heat.requires_grad, method
        assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0 + 1e-6, method
        assert torch.allclose(heat.flatten(1).amax(1), torch.ones(2)), method  # scaled per image
    assert no_hooks(model)


def test_gradcam_on_mlp_raises_clear_error_and_other_methods_work():
    mlp = create_model("mlp-matched").eval()
    x = torch.randn(2, 1, 48, 48)
    for method in ("gradcam", "guided-gradcam"):
        with pytest.raises(ValueError, match="needs a CNN feature map.*use saliency"):
            attribute(mlp, x, method)
    assert attribute(mlp, x, "saliency").shape == (2, 48, 48)


def test_targets_predicted_int_and_tensor():
    m = LinearNet().eval()
    x = torch.randn(4, 1, 48, 48)
    pred = m(x).argmax(1)
    torch.testing.assert_close(attribute(m, x, "saliency"), attribute(m, x, "saliency", target=pred))
    with pytest.raises(ValueError, match="target classes must be in 0..2"):
        attribute(m, x, "saliency", target=5)
    with pytest.raises(ValueError, match="3 entries for a batch of 4"):
        attribute(m, x, "saliency", target=torch.tensor([0, 1, 2]))


def test_model_state_is_left_as_found():
    model = create_model("fer-resnet-s")
    model.train()
    model.stem[0].weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 48, 48)
    heat = attribute(model, x, "gradcam")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics untouched
    assert model.training  # restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(heat, attribute(model.eval(), x, "gradcam"))  # explained in eval mode
    inplace = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    attribute(model, x, "guided-gradcam")
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == inplace


# ----------------------------------------------------------------------------- hooks
class Boom(RuntimeError):
    pass


class ExplodingHead(GapNet):
    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        if getattr(self, "explode", False):
            raise Boom("head failed")
        return super().forward_head(f)


def test_hooks_removed_after_exceptions():
    model = create_model("fer-resnet-s").eval()
    with pytest.raises(Boom), capture(model, ["stem.0", "stages.1"]):
        assert not no_hooks(model)
        raise Boom("inside the block")
    assert no_hooks(model)
    net = ExplodingHead().eval()
    x = torch.randn(2, 1, 48, 48)
    net.explode = True
    for method in ("gradcam", "guided-gradcam", "saliency"):
        with pytest.raises(Boom):
            get_explainer(method, net)(x, torch.tensor([0, 0]))
        assert no_hooks(net), method
    # a layer's output is captured even though the forward pass stops right after it
    out = layer_output(model, "stages.1", torch.randn(2, 1, 48, 48))
    assert out.shape == (2, 64, 24, 24) and no_hooks(model)


# ----------------------------------------------------------------------------- faithfulness
def test_faithfulness_on_model_with_known_region():
    m = RegionNet().eval()
    x = 1.0 + 0.1 * torch.randn(6, 1, 48, 48)
    t = torch.zeros(6, dtype=torch.long)
    right = torch.zeros(6, 48, 48)
    right[:, 12:24, 16:32] = 1.0
    good = deletion_insertion(m, x, right, t, steps=16).summary()
    bad = deletion_insertion(m, x, 1.0 - right, t, steps=16).summary()
    assert good["deletion_auc"] < good["deletion_random_auc"] - 0.2
    assert good["insertion_auc"] > good["insertion_random_auc"] + 0.1
    assert good["deletion_gain"] > 0.2 and good["insertion_gain"] > 0.1
    assert bad["deletion_auc"] > bad["deletion_random_auc"] + 0.1  # a reversed map is worse than chance
    assert bad["deletion_gain"] < -0.1 and bad["insertion_gain"] < -0.2
    # saliency of this model is the region: as faithful as the true map
    sal = attribute(m, x, "saliency", target=0)
    assert deletion_insertion(m, x, sal, t, steps=16).summary()["deletion_gain"] > 0.2


def test_faithfulness_curve_end_points_and_ranks():
    m = LinearNet().eval()
    x = torch.randn(3, 1, 48, 48)
    t = torch.tensor([0, 1, 2])
    f = deletion_insertion(m, x, torch.rand(3, 48, 48), t, steps=4, baseline=0.0)
    p_img = m(x).softmax(1)[torch.arange(3), t].detach().numpy()
    p_base = m(torch.zeros_like(x)).softmax(1)[torch.arange(3), t].detach().numpy()
    np.testing.assert_allclose(f.deletion[:, 0], p_img, rtol=1e-5)
    np.testing.assert_allclose(f.deletion[:, -1], p_base, rtol=1e-5)
    np.testing.assert_allclose(f.insertion[:, 0], p_base, rtol=1e-5)
    np.testing.assert_allclose(f.insertion[:, -1], p_img, rtol=1e-5)
    assert f.deletion.shape == (3, 5) and len(f.per_image()) == 3
    heat = torch.tensor([[[0.1, 0.9], [0.5, 0.0]]])
    assert ranks_from_heat(heat).tolist() == [[2, 0, 1, 3]]


def test_baseline_value_is_normalised_mean_grey():
    assert baseline_value(Normalizer("dataset", 0.5, 0.25)) == pytest.approx(0.0)
    assert baseline_value(Normalizer("unit")) == pytest.approx(0.5)
    assert baseline_value(Normalizer("none")) == pytest.approx(127.5)
    assert baseline_value(Normalizer("image")) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- layers, feature maps, filters
def test_list_layers_and_feature_maps_shapes():
    model = create_model("fer-resnet-s").eval()
    layers = {i.name: i for i in list_layers(model)}
    assert layers["stem.0"].shape == (32, 48, 48) and layers["stages.3"].shape == (256, 6, 6)
    assert layers["stages.1"].type == "Sequential" and layers["stages.1"].channels == 64
    assert "fc" not in layers and "drop" not in layers  # 2D outputs are not listed
    maps = feature_maps(model, "stages.1", torch.randn(1, 1, 48, 48))
    assert maps.shape == (64, 24, 24)
    # the BN output is captured before the in-place ReLU after it overwrites it (it has negative values)
    assert float(feature_maps(model, "stem.1", torch.randn(1, 1, 48, 48)).min()) < 0
    assert list_layers(create_model("mlp-matched")) == []
    assert no_hooks(model)
    with pytest.raises(ValueError, match="did you mean stages.1"):
        check_layer(model, "stages.1.0x")
    with pytest.raises(ValueError, match="'fc' has no 4D feature map.*valid layers"):
        check_layer(model, "fc")


class EdgeNet(FerModel):
    """One conv layer: filter 0 responds to horizontal edges, filter 1 to vertical ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        sobel = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([sobel, sobel.T])[:, None])
        self.fc = nn.Linear(2, 7)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))


def test_gradient_ascent_finds_each_filters_pattern():
    net = EdgeNet().eval()
    norm = Normalizer("dataset", 0.5, 0.25)
    res = visualize_filters(net, "conv", norm, config=AscentConfig(steps=40))
    assert res.images.shape == (2, 48, 48) and float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    assert bool((res.final_activation > 3 * res.start_activation).all())
    with torch.no_grad():
        act = torch.relu(net.conv(norm(res.images[:, None]))).mean(dim=(2, 3))  # (F image, 2 filters)
    assert act[0, 0] > 2 * act[0, 1] and act[1, 1] > 2 * act[1, 0]  # each image excites its own filter most
    assert no_hooks(net)


class SilentNet(nn.Module):
    """A conv whose second filter is silent (biased far below 0) on any [0, 1] image, then an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.bias.copy_(torch.tensor([0.0, -5.0]))
        self.fc = nn.Linear(2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_gradient_ascent_on_a_relu_layer_wakes_a_filter_silent_on_the_start_image():
    net = SilentNet().eval()
    norm = Normalizer("unit")
    res = visualize_filters(net, "act", norm, config=AscentConfig(steps=24))
    assert bool((res.final_activation > res.start_activation).all()), (res.start_activation, res.final_activation)
    assert float(res.images[1].mean()) > 0.6  # the silent filter's input brightens towards its positive weights
    assert no_hooks(net)
    with torch.no_grad():  # on a layer with a gradient everywhere, the layer's own output as before
        out = _channel_means(net, "conv", norm(torch.full((2, 1, 48, 48), 0.5)), torch.tensor([0, 1]))
    mean_conv = 0.1 * 0.5 * 142**2 / 48**2  # 0.1 x 0.5 over the in-bounds neighbours: (3 x 48 - 2)^2 in all
    assert torch.allclose(out, torch.tensor([mean_conv, 0.05 * (mean_conv - 5)]), atol=1e-5)


def test_gradient_ascent_raises_activation_of_trained_model(trained_tiny_run):
    from ferlab.checkpoint import load_checkpoint, normalizer_from_meta

    model, meta = load_checkpoint(trained_tiny_run)
    res = visualize_filters(model, "stages.0", normalizer_from_meta(meta), channels=range(8),
                            config=AscentConfig(steps=16))
    assert res.images.shape == (8, 48, 48)
    raised = res.final_activation > res.start_activation
    assert int(raised.sum()) >= 6 and float(res.final_activation.mean()) > float(res.start_activation.mean())


# ----------------------------------------------------------------------------- command line
def run_cli(*argv: str) -> int:
    from ferlab.cli import main

    return main(list(argv))


def test_cli_explain_data_split(trained_tiny_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli("explain", str(trained_tiny_run), "--images", "data:test:4", "--method", "saliency",
                   "--target", "true", "--out", str(out)) == 0
    report = json.loads((out / "explain-saliency.json").read_text())
    assert report["n_images"] == 4 and report["accuracy"] is not None
    assert {"deletion_auc", "insertion_auc", "deletion_gain", "insertion_gain"} <= set(report["faithfulness"])
    assert all(r["target"] == r["true"] for r in report["images"])
    assert (out / "grid-saliency.png").is_file() and len(list(out.glob("00*-saliency.png"))) == 4
    assert "faithfulness: deletion AUC" in capsys.readouterr().out


def test_cli_explain_image_files_any_size(trained_tiny_run, tmp_path):
    import cv2

    img = tmp_path / "face.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8))
    out = tmp_path / "exp"
    assert run_cli("explain", str(trained_tiny_run), "--images", str(img), "--method", "gradcam", "--target", "Happy",
                   "--no-faithfulness", "--out", str(out)) == 0
    report = json.loads((out / "explain-gradcam.json").read_text())
    assert report["images"][0]["target"] == "Happy" and report["images"][0]["true"] is None
    assert report["faithfulness"] is None and (out / "000-face-gradcam.png").is_file()


def test_cli_filters_feature_maps_layers(trained_tiny_run, tmp_path, capsys):
    import cv2

    png = tmp_path / "filters.png"
    assert run_cli("filters", str(trained_tiny_run), "--layer", "stages.0", "--steps", "3", "--channels", "0-3",
                   "--out", str(png)) == 0
    assert cv2.imread(str(png)) is not None
    fm = tmp_path / "fm.png"
    assert run_cli("feature-maps", str(trained_tiny_run), "--layer", "stages.1", "--image", "data:test:2",
                   "--out", str(fm)) == 0
    assert cv2.imread(str(fm)) is not None
    assert "64 of 64 maps of 24x24" in capsys.readouterr().out
    assert run_cli("layers", str(trained_tiny_run)) == 0
    text = capsys.readouterr().out
    assert "stages.3" in text and "(256, 6, 6)" in text
    assert run_cli("layers", str(trained_tiny_run), "--json") == 0
    assert {"name": "stem.0", "type": "Conv2d", "shape": [32, 48, 48], "channels": 32} in json.loads(
        capsys.readouterr().out)


def test_cli_figures_named_without_a_suffix_are_pngs_and_the_path_printed_is_the_one_written(
        trained_tiny_run, tmp_path, capsys):
    assert run_cli("feature-maps", str(trained_tiny_run), "--layer", "stages.1", "--image", "data:test:2",
                   "--out", str(tmp_path / "fmaps")) == 0
    assert (tmp_path / "fmaps.png").is_file() and f"wrote {tmp_path / 'fmaps.png'}" in capsys.readouterr().out
    assert run_cli("filters", str(trained_tiny_run), "--layer", "stages.0", "--steps", "1", "--max-filters", "2",
                   "--out", str(tmp_path / "filt")) == 0
    assert (tmp_path / "filt.png").is_file() and f"wrote {tmp_path / 'filt.png'}" in capsys.readouterr().out


def test_explained_probabilities_are_calibrated_as_predict_reports_them(trained_tiny_run):
    from ferlab.explain.pipeline import explain_images
    from ferlab.inference.loader import load_model

    m = load_model(str(trained_tiny_run))
    faces = np.random.default_rng(3).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    m.module.float().eval()
    raw = explain_images(m.module, m.normalizer, faces, "saliency", faithfulness=False)
    hot = explain_images(m.module, m.normalizer, faces, "saliency", faithfulness=False, temperature=2.0)
    want = torch.softmax(torch.log(raw.probs) / 2.0, 1)
    assert torch.allclose(hot.probs, want, atol=1e-6) and torch.equal(hot.targets, raw.targets)
    assert not torch.allclose(hot.probs, raw.probs)


def test_cli_limits_and_no_per_image(trained_tiny_run, tmp_path, capsys):
    # without --channels, --max-filters / --max-channels cap how many filters or maps are drawn
    assert run_cli("filters", str(trained_tiny_run), "--layer", "stages.0", "--steps", "2", "--max-filters", "3",
                   "--out", str(tmp_path / "f.png")) == 0
    assert "stages.0: 3 of 32 filters" in capsys.readouterr().out
    assert run_cli("feature-maps", str(trained_tiny_run), "--layer", "stages.1", "--image", "data:test:2",
                   "--max-channels", "5", "--out", str(tmp_path / "fm.png")) == 0
    assert "5 of 64 maps of 24x24" in capsys.readouterr().out
    # --no-per-image: the grid and the JSON, no per-face figures
    out = tmp_path / "exp"
    assert run_cli("explain", str(trained_tiny_run), "--images", "data:test:3", "--method", "saliency",
                   "--no-faithfulness", "--no-per-image", "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["explain-saliency.json", "grid-saliency.png"]
    assert json.loads((out / "explain-saliency.json").read_text())["n_images"] == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["filters", "{run}", "--layer", "stages.9", "--steps", "1"], "layer 'stages.9' is not a layer"),
    (["feature-maps", "{run}", "--layer", "fc", "--image", "data:test:0"], "'fc' has no 4D feature map"),
    (["explain", "{run}", "--images", "data:test:2", "--method", "lime"], "unknown explanation method 'lime'"),
    (["explain", "{run}", "--images", "{tmp}/missing.png"], "missing.png: no such file"),
    (["explain", "{run}", "--images", "{tmp}/face.png", "--target", "true"], "--target true needs labelled faces"),
    (["explain", "{run}", "--images", "data:tset:2"], "bad data spec 'data:tset:2'"),
    (["explain", "{run}", "--images", "data:test:2", "--target", "Bored"], "unknown target 'Bored'"),
    (["feature-maps", "{run}", "--layer", "stem", "--image", "data:test:100000"], "fewer than 100001"),
    (["explain", "{tmp}/model.onnx", "--images", "data:test:2"], "model.onnx: explanations need the model's gradients"),
    (["filters", "{tmp}/model.onnx", "--layer", "stem"], "name the run directory or .safetensors checkpoint"),
    (["explain", "{run}", "--images", "data:test:2", "--faith-steps", "1"], "--faith-steps must be at least 2, got 1"),
    (["explain", "{run}", "--images", "data:test", "--count", "-1"], "--count must be at least 1, got -1"),
    (["feature-maps", "{run}", "--layer", "stem", "--image", "data:test:0", "--out", "{tmp}"], "is a folder"),
])
def test_cli_errors(trained_tiny_run, tmp_path, capsys, argv, message):
    import cv2

    cv2.imwrite(str(tmp_path / "face.png"), np.zeros((48, 48), np.uint8))
    argv = [a.format(run=trained_tiny_run, tmp=tmp_path) for a in argv]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert f"ferlab {argv[0]}: error:" in err and message in err


def test_explainer_settings_are_typed_parameters_and_typos_are_refused():
    from ferlab.explain.methods import EXPLAINERS, explainer_parameters, get_explainer

    assert explainer_parameters("smoothgrad") == {"baseline": 0.0, "clip_percent": 1.0, "samples": 16,
                                                  "noise": 0.15, "seed": 0}
    assert explainer_parameters("occlusion") == {"baseline": 0.0, "clip_percent": 1.0, "window": 6, "stride": 3}
    assert get_explainer("integrated-gradients", None, steps=8).steps == 8
    with pytest.raises(ValueError, match="smoothgrad takes no sample; its settings: baseline=0.0, .*samples=16"):
        get_explainer("smoothgrad", None, sample=8)
    with pytest.raises(ValueError, match="saliency takes no steps"):
        get_explainer("saliency", None, steps=8)
    with pytest.raises(ValueError, match="occlusion needs window >= 1"):
        get_explainer("occlusion", None, window=0)
    for name in EXPLAINERS:  # every method takes the common settings
        assert {"baseline", "clip_percent"} <= set(explainer_parameters(name))
