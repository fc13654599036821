import pytest
import torch
import torch.nn as nn

from sparsify.errors import DataError
from sparsify.models import MODELS, create_model, pretrained_mobilenet_v2, sample_input

torch.set_num_threads(1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_on_its_sample_input(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = sample_input(name, batch_size=2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 2 if name == "transformer" else 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "lenet"])
def test_image_models_adapt_to_digits_size(name):
    model = create_model(name, num_classes=10, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        assert model(sample_input(name, 3, in_channels=1, image_size=8)).shape == (3, 10)


def test_small_input_stem_is_3x3_stride_1():
    model = create_model("resnet18")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    # at ImageNet size the torchvision stem stays
    big = create_model("resnet18", num_classes=1000, in_channels=3, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)


def test_transformer_is_built_from_linear_matmul_softmax():
    model = create_model("transformer")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # q, k, v, out, fc1, fc2 per layer + the classifier
    assert len(linears) == 2 * 6 + 1
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_transformer_ignores_padding():
    torch.manual_seed(0)
    model = create_model("transformer", vocab_size=50, max_len=16).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    longer = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        # more padding gives the same logits: padded keys get no attention, no pooling weight
        assert torch.allclose(model(ids), model(longer), atol=1e-5)


def test_sample_input_is_deterministic_and_typed():
    a, b = sample_input("transformer", 4), sample_input("transformer", 4)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert (a[0] != 0).all() and (a == 0).any()
    assert sample_input("resnet50", 2).shape == (2, 1, 28, 28)


def test_unknown_model_lists_valid_names():
    with pytest.raises(DataError, match="unknown model 'resnet19'.*resnet18.*transformer"):
        create_model("resnet19")
    with pytest.raises(DataError, match="does not take"):
        create_model("resnet18", vocab_size=3)


def test_pretrained_mobilenet_v2_from_package():
    model = pretrained_mobilenet_v2()
    assert model.classifier[1].out_features == 1000
    assert not model.training
    # ImageNet weights, not a fresh init: the first conv's weights have a trained spread
    w = model.features[0][0].weight
    assert w.shape == (32, 3, 3, 3) and w.abs().max() > 1.0
    # same architecture as create_model at ImageNet size, so checkpoints interchange
    twin = create_model("mobilenet_v2", num_classes=1000, in_channels=3, image_size=224)
    twin.load_state_dict(model.state_dict())


def test_pretrained_mobilenet_v2_recognizes_a_real_cat_photo():
    np = pytest.importorskip("numpy")
    skdata = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    img = resize(skdata.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (torch.from_numpy(img).permute(2, 0, 1) - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        top = pretrained_mobilenet_v2()(x[None]).argmax(1).item()
    assert 281 <= top <= 285  # the ImageNet domestic-cat classes
