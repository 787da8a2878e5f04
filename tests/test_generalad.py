"""GeneralAD family: each distortion marks exactly the patches it changes, a tiny model trains, export parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train.models import create_model
from train.models.generalad import (DISTORTIONS, WeightAverage, distort, generation_step, parse_distortions,
                                    patch_mask)

GRID = (8, 8)


def _tiny(**kw):
    return create_model("generalad_lite", image_size=64, pretrained=False, hidden=16, heads=2, **kw)


def test_patch_mask_sizes():
    gen = torch.Generator().manual_seed(0)
    m = patch_mask(64, GRID, (0.1, 0.25), gen)
    counts = m.sum(1)
    assert m.shape == (64, 64) and m.dtype == torch.bool
    assert int(counts.min()) >= round(0.1 * 64) and int(counts.max()) <= round(0.25 * 64)
    fixed = patch_mask(5, GRID, (0.5, 0.5), gen)
    assert fixed.sum(1).tolist() == [32] * 5


@pytest.mark.parametrize("kind", DISTORTIONS)
def test_each_distortion_changes_exactly_its_mask(kind):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(6, 64, 12, generator=gen)
    attention = torch.rand(6, 64, generator=gen)
    out, mask, target = distort(tokens, kind, GRID, (0.1, 0.2), 0.25, gen, attention)
    assert out.shape == tokens.shape and mask.shape == (6, 64)
    assert torch.equal(target > 0, mask)  # the target marks exactly the distorted patches
    if kind == "blend":  # a graded target: the blend weight, one per image, never below BLEND_MIN
        from train.models.generalad import BLEND_MIN

        for i in range(6):
            w = target[i, mask[i]]
            assert float(w.min()) == float(w.max()) and BLEND_MIN <= float(w[0]) <= 1.0
    elif kind == "graded":  # one strength per image; the target grows with it and stops at 1
        from train.models.generalad import GRADED_RANGE

        for i in range(6):
            w = target[i, mask[i]]
            assert float(w.min()) == float(w.max()) and GRADED_RANGE[0] <= float(w[0]) <= 1.0
            if float(w[0]) < 1.0:  # the noise is as strong as the target says (0.25 = noise_std)
                spread = float((out[i, mask[i]] - tokens[i, mask[i]]).std())
                assert 0.6 < spread / (0.25 * float(w[0])) < 1.5
    elif kind == "halo":  # strength falls off in space: a blob's rim and the ring around it weaker than its inside
        for i in range(6):
            w = target[i, mask[i]]
            assert len(torch.unique(w)) >= 2 and float(w.max()) <= 1.0
            weak = mask[i] & (target[i] < 1.0)  # the noise is as strong as the target says (0.25 = noise_std)
            z = (out[i, weak] - tokens[i, weak]) / (0.25 * target[i, weak])[:, None]
            assert 0.6 < float(z.std()) < 1.5
    else:
        assert torch.equal(target, mask.float())
    counts = mask.sum(1)
    assert int(counts.min()) >= round(0.1 * 64)
    if kind != "halo":  # the halo adds the ring of tokens around the blob
        assert int(counts.max()) <= round(0.2 * 64)
    changed = (out != tokens).any(-1)
    assert torch.equal(changed, mask), f"{kind}: changed tokens differ from the mask"
    if kind == "attention":  # the most-attended patches are the distorted ones
        for i in range(6):
            k = int(counts[i])
            assert set(torch.topk(attention[i], k).indices.tolist()) == set(torch.nonzero(mask[i]).squeeze(1).tolist())
    if kind == "shuffle":  # the same token set, moved
        for i in range(6):
            a = torch.sort(out[i, mask[i]], dim=0).values
            b = torch.sort(tokens[i, mask[i]], dim=0).values
            assert torch.equal(a, b)


@pytest.mark.parametrize("position", [True, False])
def test_position_embedding_switch(position):
    torch.manual_seed(0)
    disc = _tiny(position_embedding=position).eval().discriminator
    with torch.no_grad():
        if position:  # make the learned positions matter as after training
            disc.position.normal_(0, 1)
        tokens = torch.randn(2, 64, disc.embed.in_features)
        perm = torch.randperm(64)
        logits, _ = disc(tokens)
        permuted, _ = disc(tokens[:, perm])
    # position-blind: permuting the patches permutes their scores, nothing else
    assert torch.allclose(permuted, logits[:, perm], atol=1e-5) is (not position)
    assert ("position" in dict(disc.named_parameters())) is position


def test_wide_graded_range_makes_the_target_proportional_to_the_strength():
    """graded_range [0.2, 8] with saturation 8: the target is u / 8 and the noise std u * noise_std, u per image."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(64, 64, 12, generator=gen)
    out, mask, target = distort(tokens, "graded", GRID, (0.2, 0.3), 0.25, gen, graded=(0.2, 8.0, 8.0))
    strengths = []
    for i in range(64):
        w = target[i, mask[i]]
        assert float(w.min()) == float(w.max()) and 0.2 / 8 <= float(w[0]) <= 1.0
        spread = float((out[i, mask[i]] - tokens[i, mask[i]]).std())
        assert 0.8 < spread / (0.25 * 8 * float(w[0])) < 1.25  # noise std = u * noise_std, u = 8 * target
        strengths.append(float(w[0]) * 8)
    assert max(strengths) > 4 and min(strengths) < 2  # the whole range is drawn, not the old (0.2, 2)
    with pytest.raises(ValueError, match="graded_range"):
        _tiny(graded_range=[2.0, 1.0])


def test_fine_preset_is_generalad_lite_at_384_px_with_the_wide_graded_range():
    """generalad_lite_fine: the settings its documented bottle figures were measured with; any of them overridable."""
    m = create_model("generalad_lite_fine", pretrained=False)
    assert (m.cfg.height, m.cfg.width) == (384, 384) and m.family == create_model("generalad_lite", pretrained=False).family
    assert tuple(m.cfg.graded_range) == (0.2, 8.0) and m.cfg.graded_saturation == 8.0 and m.cfg.lighting_copies == 3
    assert m.cfg.weight_average == 0.99 and create_model("generalad_lite", pretrained=False).cfg.weight_average == 0
    m = create_model("generalad_lite_fine", image_size="256x128", graded_range=[0.2, 4], pretrained=False)
    assert (m.cfg.height, m.cfg.width) == (128, 256) and tuple(m.cfg.graded_range) == (0.2, 4.0)


def test_position_blind_checkpoints_with_the_old_zero_buffer_still_load():
    model = _tiny(position_embedding=False)
    state = dict(model.state_dict())
    state["discriminator.position"] = torch.zeros(1, 64, 16)  # what 1177710..dbe2152 wrote
    model.load_state_dict(model.upgrade_state_dict(state))
    state["discriminator.position"] = torch.ones(1, 64, 16)
    with pytest.raises(ValueError, match="position_embedding=false"):
        model.upgrade_state_dict(state)


def test_attention_needs_attention_and_bad_names_refused():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="attention"):
        distort(torch.zeros(1, 64, 4), "attention", GRID, (0.1, 0.2), 0.25, gen)
    with pytest.raises(ValueError, match="comma list"):
        parse_distortions("noise,blur")
    with pytest.raises(ValueError, match="comma list"):
        _tiny(distortions="blur")


def test_generation_step_combines_kinds_and_keeps_clean_images():
    model = _tiny(clean_fraction=0.25)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(8, 64, model.channels, generator=gen)
    tokens, targets = generation_step(model, clean, parse_distortions(model.cfg.distortions), gen)
    assert torch.equal(tokens[:2], clean[:2]) and not targets[:2].any()
    assert torch.equal((tokens != clean).any(-1), targets > 0)
    assert bool((targets[2:].sum(1) > 0).all())


def test_lighting_copies_cache_relit_images_as_normal_with_the_original_statistics():
    """Each copy is every training image under its own gain; the token statistics stay those of the originals."""
    from train.data import relit
    from train.models.generalad import token_cache

    frames = np.random.default_rng(0).integers(40, 200, (4, 64, 64, 3), dtype=np.uint8)
    torch.manual_seed(0)
    plain = _tiny(lighting_copies=0)
    base = token_cache(plain, frames, "cpu")
    torch.manual_seed(0)  # the same random backbone (no pretrained weights in tests)
    model = _tiny(lighting_copies=2, lighting_gain=0.2)
    cache = token_cache(model, frames, "cpu", seed=5)
    assert cache.shape == (12, *base.shape[1:])
    torch.testing.assert_close(cache[:4], base)  # the images as taken come first, unchanged
    torch.testing.assert_close(model.token_mean, plain.token_mean)
    again = relit(frames, 0.2, np.random.default_rng(5))  # the first copy's images
    with torch.no_grad():
        torch.testing.assert_close(cache[4:8], model.tokens(model.preprocess(torch.from_numpy(again))), rtol=1e-4, atol=1e-4)
    ratio = again.astype(float).mean(axis=(1, 2, 3)) / frames.astype(float).mean(axis=(1, 2, 3))
    assert np.all(np.abs(ratio - 1) <= 0.2 + 1e-2) and np.ptp(ratio) > 0.01  # one gain per image, within the spread
    with pytest.raises(ValueError, match="lighting_gain"):
        _tiny(lighting_gain=1.5)


def test_distort_before_pool_trains_on_the_tokens_the_graph_scores():
    """The cached pre-pool grid, averaged, is exactly what the deployed graph feeds the discriminator;
    pseudo-defects are averaged with it and their targets become the distorted share of each neighbourhood."""
    from train.models.generalad import token_cache

    model = _tiny(distort_before_pool=True, clean_fraction=0.25, distortions="noise,copy", lighting_copies=0)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    cache = token_cache(model, frames, "cpu")
    with torch.no_grad():
        deployed = model.tokens(model.preprocess(torch.from_numpy(frames)))
    torch.testing.assert_close(model.pool_tokens(cache), deployed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cache, deployed)  # the cache really is the grid before averaging
    gen = torch.Generator().manual_seed(0)
    tokens, targets = generation_step(model, cache, parse_distortions(model.cfg.distortions), gen)
    torch.testing.assert_close(tokens[:1], deployed[:1], rtol=1e-5, atol=1e-5)  # the clean image: deployed tokens
    assert not targets[:1].any() and float(targets.min()) >= 0.0 and float(targets.max()) <= 1.0
    soft = (targets > 0) & (targets < 1)
    assert bool(soft[1:].any()), "averaging gives the border patches of a pseudo-defect a partial target"


def test_weight_average_is_the_ramped_moving_average_of_the_steps():
    lin = torch.nn.Linear(2, 1)
    start = [p.detach().clone() for p in lin.parameters()]
    average = WeightAverage(lin, 0.9)
    expected = [s.clone() for s in start]
    for t in range(1, 31):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(1.0)  # a "step": every weight moves by 1
        average.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, lin.parameters())]
    last = [p.detach().clone() for p in lin.parameters()]
    average.copy_to_module()
    for e, p, s, q in zip(expected, lin.parameters(), start, last):
        assert torch.allclose(p, e, atol=1e-5)
        assert bool((p < q).all()) and bool((p > s + 20).all()), "behind the last weights, far from the first"
    with pytest.raises(ValueError, match="weight_average"):
        _tiny(weight_average=1.0)


def test_tiny_model_with_weight_average_ends_on_the_average(tmp_path, synthetic_root):
    from train.loop import TrainConfig, load_checkpoint, train

    kw = {"hidden": 16, "heads": 2, "learning_rate": 3e-3}
    runs = {}
    for decay in (0.0, 0.9):
        cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path / f"run{decay}"), model="generalad_lite",
                          image_size=64, steps=30, batch_size=4, seed=0, save_every=0, pretrained=False,
                          model_kwargs={**kw, "weight_average": decay})
        runs[decay], _ = load_checkpoint(train(cfg))
    plain, averaged = (dict(runs[d].discriminator.named_parameters()) for d in (0.0, 0.9))
    assert runs[0.9].cfg.weight_average == 0.9
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain), "the averaged weights are not the last ones"


@pytest.mark.parametrize("distortions", ["graded", "noise"])  # the default and the paper's noise
def test_tiny_model_trains_and_its_loss_falls(tmp_path, synthetic_root, distortions):
    from train.loop import TrainConfig, load_checkpoint, train

    cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path / "run"), model="generalad_lite", image_size=64,
                      steps=40, batch_size=4, seed=0, save_every=0, pretrained=False,
                      model_kwargs={"hidden": 16, "heads": 2, "distortions": distortions, "learning_rate": 3e-3})
    ckpt = train(cfg)
    model, blob = load_checkpoint(ckpt)
    assert model.family == "generalad" and blob["family"] == "generalad"
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0]
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = model(torch.from_numpy(frames))
    assert out["raw_maps"].shape == (2, 1, 8, 8) and out["anomaly_map"].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("position", [True, False])
def test_export_parity_with_onnxruntime(tmp_path, synthetic_root, position):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx
    from runtime.model import Model
    from train.loop import TrainConfig, load_checkpoint, run_outputs, train

    cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path / "run"), model="generalad_lite", image_size=64,
                      steps=5, batch_size=2, seed=0, save_every=0, pretrained=False,
                      model_kwargs={"hidden": 16, "heads": 2, "position_embedding": position})
    ckpt = train(cfg)
    path = export_onnx(ckpt, tmp_path / "model.onnx")
    torch_model, _ = load_checkpoint(ckpt)
    frames = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ref = run_outputs(torch_model, frames, "cpu", keys=("image_score", "anomaly_map", "raw_maps"))
    out = Model(path).infer(frames)
    for k in ("image_score", "anomaly_map", "raw_maps"):
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-4)
