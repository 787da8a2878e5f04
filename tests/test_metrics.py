import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from calibration.metrics import aupro, auroc, evaluate, f1_max


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_hand_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([0, 0, 1], [0.1, 0.3, 0.2]) == 0.5
    with pytest.raises(ValueError):
        auroc([1, 1], [0.1, 0.2])


def test_f1_max_hand_case_and_sklearn():
    # >=0.8: F1 2/3; >=0.5: 1/2; >=0.4: tp 2, fp 1 -> P 2/3, R 1, F1 0.8 (best); >=0.1: 2/3
    f1, thr = f1_max([0, 0, 1, 1], [0.1, 0.5, 0.4, 0.8])
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.4)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(y, 1.0)
    p, r, _ = precision_recall_curve(y, s)
    ref = np.max(2 * p * r / np.maximum(p + r, 1e-12))
    assert f1_max(y, s)[0] == pytest.approx(ref, abs=1e-9)


def test_aupro_perfect_and_hand_computed():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0:2, 0:2] = True  # region A, 4 px
    masks[1, 3, 3] = True  # region B, 1 px
    perfect = masks.astype(float)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    # map that finds region B only at the top score, region A below every normal pixel:
    m = np.zeros((2, 4, 4))
    m[1, 3, 3] = 2.0
    m[0, 0:2, 0:2] = -1.0
    # PRO = 0.5 from FPR 0 up to FPR 1 (normal pixels all at 0 tie) -> area to 0.3 = 0.5*0.3 (linear interpolation of
    # the step from (0,0.5) to (1,0.5)), normalized -> 0.5
    assert aupro(masks, m) == pytest.approx(0.5)
    # a random map scores about the area under the diagonal up to 0.3: 0.3/2 = 0.15
    rng = np.random.default_rng(0)
    big = np.zeros((20, 32, 32), bool)
    big[:, 8:16, 8:16] = True
    assert aupro(big, rng.random(big.shape)) == pytest.approx(0.15, abs=0.02)


def test_evaluate_bundle():
    masks = np.zeros((4, 8, 8), bool)
    masks[2:, 2:4, 2:4] = True
    maps = masks.astype(float) + 0.01
    s = evaluate(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), masks, maps)
    assert s.image_auroc == 1.0 and s.pixel_auroc == 1.0 and s.aupro == pytest.approx(1.0) and s.f1_max == 1.0
