import pytest
import torch
from torch import nn

from dynbatch.errors import UserError
from dynbatch.models import MODELS, SIZED, build_model, final_linear


@pytest.mark.parametrize("name", [n for n in MODELS if n != "alexnet" and n not in SIZED])  # images
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_models_accept_any_input(name, shape):
    torch.manual_seed(0)
    m = build_model(name, num_classes=7, in_channels=shape[0]).eval()
    out = m(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    head = final_linear(m)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    # The head really produces the logits: a hook on it sees exactly the model's output.
    seen = {}
    h = head.register_forward_hook(lambda mod, i, o: seen.setdefault("o", o))
    out2 = m(torch.randn(2, *shape))
    h.remove()
    assert torch.equal(seen["o"], out2)


def test_gpt_maps_tokens_to_next_token_logits_through_its_head():
    torch.manual_seed(0)
    m = build_model("gpt", num_classes=50, in_channels=1, context=12, layers=2, width=16, heads=2).eval()
    tokens = torch.randint(0, 50, (3, 12))
    out = m(tokens)
    assert out.shape == (3, 12, 50) and final_linear(m) is m.lm_head
    torch.testing.assert_close(out, m.lm_head(m.features(tokens)))
    # causal: a token's logits do not depend on the tokens after it
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    torch.testing.assert_close(m(changed)[:, :6], out[:, :6])
    with pytest.raises(UserError, match="multiple of"):
        build_model("gpt", num_classes=50, in_channels=1, width=30, heads=4)


def test_torchvision_alexnet_small_inputs():
    m = build_model("alexnet", num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 8, 8)).shape == (1, 5)
    assert final_linear(m) is m.classifier[6]


def test_preresnet_depths():
    n_params = {d: sum(p.numel() for p in build_model(f"preresnet{d}", 10).parameters()) for d in (20, 56)}
    assert 0.26e6 < n_params[20] < 0.28e6 and 0.84e6 < n_params[56] < 0.87e6  # the published sizes


def test_unknown_model_and_missing_head():
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet9000", 10)
    with pytest.raises(UserError, match="no nn.Linear head"):
        final_linear(nn.Sequential(nn.Conv2d(3, 3, 1)))
