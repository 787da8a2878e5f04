"""Fit policies of the host-side frame preparation (stretch, letterbox, center crop)."""
import numpy as np
import pytest

from runtime.preprocess import fit_frame, fit_geometry


def test_stretch_is_the_old_resize():
    f = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    out = fit_frame(f, 32, 48)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_letterbox_keeps_aspect_and_pads_black():
    f = np.full((50, 200, 3), 200, np.uint8)  # 4:1 into a square
    out = fit_frame(f, 64, 64, fit="letterbox")
    assert out.shape == (64, 64, 3)
    assert (out[:20] == 0).all() and (out[-20:] == 0).all()  # bars top and bottom
    assert (out[26:38] == 200).all()
    (_, _, _, _), (py, px, ph, pw) = fit_geometry(50, 200, 64, 64, "letterbox")
    assert (ph, pw) == (16, 64) and py == 24


def test_center_crop_takes_the_middle():
    f = np.zeros((40, 120, 3), np.uint8)
    f[:, 40:80] = 255  # the centred 40x40 square is white
    out = fit_frame(f, 20, 20, fit="center_crop")
    assert (out == 255).all()


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "center_crop"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (64, 64), (33, 65)])
def test_every_policy_gives_the_input_size(fit, shape):
    f = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)  # grayscale too
    out = fit_frame(f, 24, 40, fit=fit)
    assert out.shape == (24, 40, 3) and out.flags["C_CONTIGUOUS"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fit policy"):
        fit_frame(np.zeros((8, 8, 3), np.uint8), 4, 4, fit="zoom")
