import pytest
import torch

from apem.models.apem_model import APEM
from apem.data.encoding import FieldSpec
from apem.models.registry import build_model, resolve_configs

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
