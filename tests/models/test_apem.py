import dataclasses
import os
from unittest import mock

import pytest
import torch

from apem.models.apem_model import APEM
from apem.data.encoding import FieldSpec
from apem.models.registry import build_model, resolve_configs
from apem.nn import native

torch.set_num_threads(1)
FIELDS = [FieldSpec(f"f{i}", 7 + i) for i in range(5)]
SMALL = {"inducing_points": 8, "layers": 2, "embed_dim": 6, "heads": 2}


def _x(batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.cardinality, (batch,), generator=g) for f in FIELDS], dim=1)


def test_table2_defaults_and_ablation_configs():
    config, loss = resolve_configs("apem")
    assert (config.embed_dim, config.heads, config.inducing_points, config.layers) == (18, 2, 64, 4)
    assert loss.dependence_weights == 1.0
    assert resolve_configs("apem_wo_ld")[1].dependence_weights == 0.0
    assert resolve_configs("apem_wo_asrg")[0].dynamic_activation is False
    assert resolve_configs("apem_wo_ps")[0].task_indicators is False


@pytest.mark.parametrize("name,overrides", [
    ("apem", {}), ("apem", {"layer_input": "previous"}), ("apem_wo_asrg", {}), ("apem_wo_ps", {}), ("apem_wo_ld", {}),
])
def test_forward_shapes_probabilities_and_backward(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, FIELDS, 3, {**SMALL, **overrides})
    out = model(_x())
    assert out.probs.shape == (16, 3)
    assert ((out.probs > 0) & (out.probs < 1)).all()
    labels = (torch.rand(16, 3) < 0.5).float().cumprod(dim=1)
    loss, parts = model.loss(out, labels)
    loss.backward()
    assert set(parts) == {"l_m", "l_d", "total"}
    assert (parts["l_d"] == 0.0) == (name == "apem_wo_ld")
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_default_model_builds_with_paper_sizes():
    model = build_model("apem", FIELDS, 3)
    assert model.asrg.inducing.shape == (4, 64, 18)
    assert model.pattern_selector.indicator.shape == (4, 3, 18)
    assert model(_x(4)).probs.shape == (4, 3)


def test_gamma_anneals_and_selection_becomes_sparse():
    torch.manual_seed(0)
    model = build_model("apem", FIELDS, 2, {**SMALL, "gamma_decay": 1.0})
    x = _x(64)
    model.set_training_progress(0)
    assert float(model.gamma) == 10.0
    dense = model.selection_rates(x)
    model.set_training_progress(1000)
    assert float(model.gamma) == pytest.approx(1e-3)
    sparse = model.selection_rates(x)
    assert dense.shape == (64,) and (dense == 1.0).all()  # at gamma = 10 no selector logit hits -5
    assert ((sparse > 0) & (sparse < 1)).all()  # binary z_K: some inducing points off, some on
    mask = model.selector_mask(model.embedding(x))
    assert ((mask == 0) | (mask == 1)).float().mean() > 0.99


def test_gamma_is_saved_in_state_dict():
    model = build_model("apem", FIELDS, 2, SMALL)
    model.set_training_progress(500)
    other = build_model("apem", FIELDS, 2, SMALL)
    other.load_state_dict(model.state_dict())
    assert float(other.gamma) == float(model.gamma) == pytest.approx(5.0)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        APEM(FIELDS, 3, APEM.Config(embed_dim=7, heads=2))
    with pytest.raises(ValueError, match="layer_input"):
        APEM(FIELDS, 3, APEM.Config(layer_input="sideways"))
    with pytest.raises(ValueError, match="2 or more"):
        APEM(FIELDS, 1)
    with pytest.raises(ValueError, match="dynamic activation"):
        build_model("apem_wo_asrg", FIELDS, 2, SMALL).selection_rates(_x())


# Issue 10 part 1: the selector's schedule, the reading of a de-selected point, the w/o ASRG ablation.

def _annealed(reading: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("apem", FIELDS, 3, {**SMALL, "gamma_schedule": "planned", "deselected_point": reading})
    model.set_training_progress(60, 100)  # planned schedule, floor at 50 of 100 steps
    return model.eval()


def test_model_schedule_follows_the_planned_steps_and_reports_when_settled():
    model = build_model("apem", FIELDS, 3, {**SMALL, "gamma_schedule": "planned", "gamma_floor_fraction": 0.25})
    model.set_training_progress(0, 400)
    assert float(model.gamma) == 10.0 and not model.schedule_settled()
    model.set_training_progress(99, 400)
    assert float(model.gamma) > 1e-3 and not model.schedule_settled()
    model.set_training_progress(100, 400)
    assert float(model.gamma) == pytest.approx(1e-3) and model.schedule_settled()
    fixed = build_model("apem", FIELDS, 3, {**SMALL, "gamma_schedule": "fixed_rate"})
    fixed.set_training_progress(100, 400)  # the planned length is ignored: 10 - 0.01 * 100
    assert float(fixed.gamma) == pytest.approx(9.0)


@pytest.mark.parametrize("reading", ["uniform_attention", "contributes_nothing"])
def test_z_is_exactly_binary_after_annealing(reading):
    """At the floor gamma = 1e-3, f_D is exactly 0 or 1 for every selector logit outside (-5e-4, 5e-4)
    (eq. 13 keeps its cubic there; with random weights well under 1% of logits land inside, which the test bounds)."""
    model = _annealed(reading)
    x = _x(512)
    with torch.no_grad():
        h = model.embedding(x)
        mask = model.selector_mask(h)
        logits = model.selector(h.reshape(h.shape[0], -1)).view_as(mask)
    outside = logits.abs() >= 5e-4
    assert ((mask[outside] == 0) | (mask[outside] == 1)).all()
    assert float((~outside).float().mean()) < 0.01
    assert 0 < float(mask.mean()) < 1  # some points selected, some not


def _output_with_asrg_rows_replaced(model, x, rows: torch.Tensor) -> torch.Tensor:
    """Predict with the ASRG output rows where ``rows`` (B, L, K) is True replaced by noise (none replaced: all
    False).

    On the torch path (APEM_NATIVE_KERNELS=0), where the model runs its ASRG module and then the Pattern Selector:
    on CPU the kernels fuse the two into one per layer, in training and in inference, which no hook can reach
    (test_apem_fast_paths and tests/nn/test_native_pool.py hold those paths to this one)."""
    def replace(_module, _inputs, out):
        noise = torch.randn_like(out) * 5
        return torch.where(rows.transpose(0, 1).unsqueeze(-1), noise, out)

    handle = model.asrg.register_forward_hook(replace)
    try:
        with mock.patch.dict(os.environ, {native.DISABLE_ENV: "0"}), torch.no_grad():
            return model(x).probs
    finally:
        handle.remove()


def _annealed_outputs(reading: str):
    """An annealed model, its input, which (sample, layer, point) are de-selected, and its outputs."""
    x = _x(64)
    model = _annealed(reading)
    with torch.no_grad():
        return model, x, model.selector_mask(model.embedding(x)) == 0, model(x).probs


def test_a_deselected_point_changes_no_output_under_contributes_nothing():
    model, x, deselected, before = _annealed_outputs("contributes_nothing")
    with torch.no_grad():
        # a point de-selected for some samples and selected for others: change its own parameters I_k
        layer, point = next((l, k) for l in range(SMALL["layers"]) for k in range(SMALL["inducing_points"])
                            if 0 < int(deselected[:, l, k].sum()) < x.shape[0])
        off = deselected[:, layer, point]
        model.asrg.inducing[layer, point].add_(torch.randn(SMALL["embed_dim"]))
        after_inducing = model(x).probs
    torch.testing.assert_close(after_inducing[off], before[off], atol=1e-6, rtol=0)
    assert not torch.allclose(after_inducing[~off], before[~off], atol=1e-5)
    unchanged = _output_with_asrg_rows_replaced(model, x, torch.zeros_like(deselected))
    torch.testing.assert_close(unchanged, after_inducing, atol=1e-5, rtol=0)  # the torch path: the same model
    # whatever a de-selected point's row of Y_ASRG holds, no output moves ...
    torch.testing.assert_close(_output_with_asrg_rows_replaced(model, x, deselected), unchanged, atol=1e-6, rtol=0)
    # ... while a selected point's row does matter
    assert not torch.allclose(_output_with_asrg_rows_replaced(model, x, ~deselected), unchanged, atol=1e-4)


def test_under_uniform_attention_a_deselected_point_still_reaches_the_output():
    model, x, deselected, before = _annealed_outputs("uniform_attention")
    unchanged = _output_with_asrg_rows_replaced(model, x, torch.zeros_like(deselected))
    torch.testing.assert_close(unchanged, before, atol=1e-5, rtol=0)  # the torch path: the same model
    assert not torch.allclose(_output_with_asrg_rows_replaced(model, x, deselected), unchanged, atol=1e-4)


def test_contributes_nothing_needs_the_fields_stacking():
    with pytest.raises(ValueError, match="contributes_nothing"):
        build_model("apem", FIELDS, 3, {**SMALL, "deselected_point": "contributes_nothing", "layer_input": "previous"})
    with pytest.raises(ValueError, match="deselected_point"):
        build_model("apem", FIELDS, 3, {**SMALL, "deselected_point": "sometimes"})


def test_wo_asrg_differs_from_apem_only_in_the_asrg_part():
    apem, ablation = (dataclasses.asdict(resolve_configs(name)[0]) for name in ("apem", "apem_wo_asrg"))
    assert {k for k in apem if apem[k] != ablation[k]} == {"dynamic_activation"}
    assert resolve_configs("apem")[1] == resolve_configs("apem_wo_asrg")[1]  # same loss


def test_wo_asrg_layers_all_attend_over_the_fields():
    """With the default stacking, layer 2's output does not depend on layer 1's attention weights."""
    torch.manual_seed(0)
    model = build_model("apem_wo_asrg", FIELDS, 3, SMALL)
    h = model.embedding(_x(64))
    with torch.no_grad():
        before = model.self_attention_layers(h)
        model.attn_qkv[0].weight.add_(1.0)
        after = model.self_attention_layers(h)
    torch.testing.assert_close(after[1], before[1])
    assert not torch.allclose(after[0], before[0])
    stacked = build_model("apem_wo_asrg", FIELDS, 3, {**SMALL, "layer_input": "previous"})
    stacked.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(stacked.self_attention_layers(h)[1], after[1])
