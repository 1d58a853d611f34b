"""Model zoo tests: every registered model builds, runs and back-propagates; the reports' Keras counts match."""

from __future__ import annotations

import pytest
import torch

from ferlab.models import count_params, create_model, list_models
from ferlab.models.mlp import MLP, matched_mlp, mlp_param_count

# name -> (Keras "Total params", "Trainable params") as printed in the reports (r001-cnn23m: our reconstruction)
KERAS_COUNTS: dict[str, tuple[int, int]] = {
    "r000-cnn1": (1_943_927, 1_943_927),
    "r000-cnn2": (1_963_327, 1_963_327),
    "r000-cnn3": (1_841_527, 1_841_527),
    "r000-inception1": (5_699_647, 5_699_647),
    "r000-inception2": (2_486_287, 2_486_287),
    "r000-resnet1": (3_488_295, 3_488_295),
    "r000-resnet2": (4_324_455, 4_324_455),
    "r001-cnn3m": (3_235_239, 3_230_631),
    "r001-cnn23m": (23_331_559, 23_324_775),
    "r001-dnn": (32_769_159, 32_769_159),
    "r002-vgg": (1_875_143, 1_872_327),
    "r003-vgg16bn": (37_716_999, 37_708_551),
    "r003-dnn": (38_211_079, 38_211_079),
    "r004-cnn9": (1_696_583, 1_695_239),
}


def test_the_registry_holds_the_reports_and_the_modern_nets():
    assert {"fer-resnet-s", "fer-resnet-s16", "fer-resnet-m", "fer-mobile", "fer-mobile-fast", "r002-vgg"} <= set(
        list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(2, 1, 48, 48)

    model.train()
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.dim() == (2 if isinstance(model, MLP) else 4), tuple(feats.shape)
        torch.testing.assert_close(model(x), model.forward_head(feats))


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith(("fer-resnet", "fer-mobile"))])
def test_input_scale_upsamples_before_the_stem(name: str) -> None:
    torch.manual_seed(0)
    base = create_model(name).eval()
    x = torch.randn(2, 1, 48, 48)
    up = create_model(name, input_scale=2.0).eval()
    assert count_params(up) == count_params(base), "upsampling adds no parameters"
    up.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert up.forward_features(x).shape[-2:] == tuple(2 * s for s in base.forward_features(x).shape[-2:])
        # the upsampled net is the base net on the bilinearly upsampled face
        big = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(up(x), base(big))
    with pytest.raises(ValueError, match="input_scale"):
        create_model(name, input_scale=0.5)


def test_squeeze_excite_scales_each_channel_by_its_gate() -> None:
    from ferlab.models.modern import SqueezeExcite

    se = SqueezeExcite(32)  # 32 // 16 = 2 < 8: the bottleneck keeps 8 channels
    assert se.reduce.out_channels == 8
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        for conv in (se.reduce, se.expand):
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(se(x), 0.5 * x)  # every gate sigmoid(0)
        se.expand.bias.copy_(torch.linspace(-3, 3, 32))  # gates independent of x: sigmoid of the bias
        torch.testing.assert_close(se(x), x * torch.sigmoid(se.expand.bias).view(1, 32, 1, 1))


def test_se_net_is_fer_resnet_s16wd_plus_the_gates() -> None:
    plain, se = create_model("fer-resnet-s16wd"), create_model("fer-resnet-s16wd-se")
    extra = set(se.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(se.state_dict()) and extra
    assert all(".se." in k for k in extra)


@pytest.mark.parametrize("name", sorted(KERAS_COUNTS))
def test_keras_param_counts(name: str) -> None:
    counts = count_params(create_model(name))
    assert (counts["keras_total"], counts["trainable"]) == KERAS_COUNTS[name]


def test_r004_dnn_matches_report_total() -> None:
    # Report 004 gives only the DNN's total, 1,698,183; our layout must be within 0.5%.
    counts = count_params(create_model("r004-dnn"))
    assert counts["keras_total"] == counts["trainable"]
    assert abs(counts["trainable"] - 1_698_183) <= 0.005 * 1_698_183


@pytest.mark.parametrize("target", [250_000, 1_875_143, 5_000_000, 38_211_079])
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_matched_mlp_within_one_percent(target: int, depth: int) -> None:
    model = matched_mlp(target, depth=depth)
    n = count_params(model)["trainable"]
    assert abs(n - target) <= 0.01 * target
    assert len(model.hidden) == depth and len(set(model.hidden)) == 1
    assert n == mlp_param_count(48 * 48, model.hidden)


def test_matched_mlp_with_bn_and_channels() -> None:
    model = matched_mlp(1_000_000, depth=2, in_chans=3, num_classes=5, bn=True)
    assert abs(count_params(model)["trainable"] - 1_000_000) <= 10_000
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 5)


def test_matched_mlp_errors() -> None:
    with pytest.raises(ValueError, match="below the smallest"):
        matched_mlp(1_000)
    with pytest.raises(ValueError, match="depth"):
        matched_mlp(1_000_000, depth=0)
    with pytest.raises(ValueError, match="within"):
        matched_mlp(28_900, depth=1)  # between widths 12 and 13, each ~4% off


def test_mlp_matched_registry_targets() -> None:
    by_name = create_model("mlp-matched", target="r004-cnn9")
    target = count_params(create_model("r004-cnn9"))["trainable"]
    assert abs(count_params(by_name)["trainable"] - target) <= 0.01 * target
    by_number = create_model("mlp-matched", target=1_000_000, depth=4)
    assert abs(count_params(by_number)["trainable"] - 1_000_000) <= 10_000
