"""The realism effects of ``morphset synth``: shadows, colours, degradations, settings."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.render.shadow import light_visibility
from pipeline.synthetic.effects import (
    NO_EFFECTS,
    Effects,
    recolour_lights,
    sample_image_effects,
    skin_gain,
    white_balance,
)
from pipeline.synthetic.render import Lighting


def _quad(x0: float, x1: float, y0: float, y1: float, z: float) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float64)
    return v, np.array([[0, 1, 2], [0, 2, 3]])


def test_a_plate_in_front_of_a_wall_shadows_exactly_the_points_behind_it():
    wall_v, wall_t = _quad(-100, 100, -100, 100, 0.0)
    plate_v, plate_t = _quad(-20, 20, -20, 20, 50.0)
    v = np.vstack([wall_v, plate_v])
    t = np.vstack([wall_t, plate_t + 4])
    light = np.array([[0.0, 0.0, 2000.0]])  # straight above: the shadow is the plate's own square
    pts = np.array([[0.0, 0.0, 0.0], [15.0, -15.0, 0.0], [40.0, 0.0, 0.0], [-80.0, 70.0, 0.0], [0, 0, 50.0]])
    lit = light_visibility(v, t, light, pts)[:, 0]
    assert lit[0] == 0.0 and lit[1] == 0.0  # under the plate
    assert lit[2] == 1.0 and lit[3] == 1.0  # beside it
    assert lit[4] == 1.0  # the plate itself does not shadow itself
    # a light from the side moves the shadow off the middle and onto the far side
    side = light_visibility(v, t, np.array([[2000.0, 0.0, 2000.0]]), np.array([[0.0, 0, 0], [-45.0, 0, 0]]))
    assert side[0, 0] == 1.0 and side[1, 0] == 0.0


def test_white_balance_tints_without_changing_brightness():
    img = np.full((4, 4, 3), 128, np.uint8)
    out = white_balance(img, np.array([1.2, 1.0, 0.8]))
    assert out[0, 0, 0] > 128 > out[0, 0, 2]
    lin = (out[0, 0].astype(np.float64) / 255) ** 2.2
    assert abs(np.dot(lin, [0.2126, 0.7152, 0.0722]) - (128 / 255) ** 2.2) < 0.01
    assert white_balance(img, np.ones(3)) is img


def test_skin_change_is_smooth_and_centred_on_its_constant_term():
    rng = np.random.default_rng(0)
    v = np.c_[rng.uniform(-70, 70, (500, 2)), np.zeros(500)]
    field = np.zeros((6, 3))
    field[0] = [0.1, 0.0, -0.1]
    gain = skin_gain(v, field)
    assert np.allclose(gain, np.exp([0.1, 0.0, -0.1]))
    field[1, 0] = 0.2  # a left-right gradient in red
    gain = skin_gain(v, field)
    assert np.corrcoef(v[:, 0], np.log(gain[:, 0]))[0, 1] > 0.99


def test_each_light_gets_its_own_colour_and_keeps_its_strength():
    light = Lighting(
        ambient=np.full(3, 0.3), positions=np.zeros((2, 3)), colours=np.array([[0.6] * 3, [0.2] * 3])
    )
    out = recolour_lights(light, np.array([2700.0, 7500.0]))
    assert out.colours[0, 0] > out.colours[0, 2] and out.colours[1, 2] > out.colours[1, 0]  # warm, cool
    assert np.allclose(out.colours.mean(axis=1) / out.colours.mean(axis=1).sum(), [0.75, 0.25], atol=0.08)


def test_the_settings_parse_check_and_describe():
    params = load_manifest().stage_params("synth")
    fx = Effects.from_stage(params)
    assert fx.camera == "perspective" and fx.cast_shadows and all(fx.describe().values())
    off = Effects.from_stage(params | NO_EFFECTS)
    assert off.jpeg_quality == (92, 92) and not any(
        off.describe()[k] for k in ("perspective", "cast_shadows", "light_colours", "skin_change", "blur")
    )
    with pytest.raises(ValueError, match=r"stages\.synth\.noise_std: expected \[min, max\]"):
        Effects.from_stage(params | {"noise_std": [5.0, 1.0]})
    # a draw uses every range and the perspective distance only where asked
    draw = sample_image_effects(fx, np.random.default_rng(1), 250, 2)
    assert 400 <= draw.distance_mm <= 2500 and 60 <= draw.jpeg_quality <= 95
    assert 0 <= draw.blur_sigma_px <= 0.005 * 250 and draw.light_kelvin.shape == (2,)
    assert sample_image_effects(off, np.random.default_rng(1), 250, 2).distance_mm is None
