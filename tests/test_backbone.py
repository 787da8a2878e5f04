"""The shipped EfficientNet-Lite weights are real ImageNet weights (no network needed)."""
import cv2
import numpy as np
import pytest
import torch

from train.backbone import LITE_MEAN, LITE_STD, BackboneWeightsError, create_classifier, create_feature_extractor, weights_path

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _cat() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo (pip install scikit-image)")
    return skimage_data.chelsea()  # RGB photo of a cat, shipped inside scikit-image


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_classifies_a_cat(name):
    model = create_classifier(name)
    img = cv2.resize(_cat(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = torch.from_numpy(((img - LITE_MEAN) / LITE_STD).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        top5 = model(x).softmax(1)[0].topk(5).indices.tolist()
    assert top5[0] in CAT_CLASSES, top5


def test_features_differ_from_random_init():
    pre = create_feature_extractor("efficientnet_lite0", (2,))
    import timm

    rnd = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2,)).eval()
    w_pre = pre.state_dict()["conv_stem.weight"]
    w_rnd = rnd.state_dict()["conv_stem.weight"]
    assert not torch.allclose(w_pre, w_rnd)
    assert pre.state_dict()["bn1.running_var"].std() > 0  # trained BN statistics, not the init (all ones)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneWeightsError, match="no shipped weights"):
        weights_path("resnet50")
