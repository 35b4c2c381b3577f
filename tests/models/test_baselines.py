"""Baselines: shapes for N = 2 and 3, training on a small batch, and each model's defining property."""

from __future__ import annotations

import pytest
import torch

from apem.models.aitm import AITM, behavioral_expectation_calibrator
from apem.data.encoding import FieldSpec
from apem.models.escm2 import ESCM2, inverse_propensity_weight, ips_risk
from apem.models.esmm import ESMM
from apem.models.ple import PLE
from apem.models.registry import build_model, list_models

torch.set_num_threads(1)

BASELINES = ["single_task", "shared_bottom", "mmoe", "ple", "aitm", "esmm", "escm2_ips", "escm2_dr"]
FIELDS = [FieldSpec("a", 7), FieldSpec("b", 5), FieldSpec("c", 11), FieldSpec("d", 3)]


def random_batch(rows: int, n_tasks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and funnel-consistent labels that depend on field 'a', so there is something to learn."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, f.cardinality, (rows,), generator=gen) for f in FIELDS], dim=1)
    step_prob = torch.sigmoid((x[:, 0].float() - 3) * 1.5).unsqueeze(1).expand(rows, n_tasks)
    passes = torch.rand(rows, n_tasks, generator=gen) < step_prob
    labels = torch.cumprod(passes.float(), dim=1)
    return x, labels


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("name", BASELINES)
def test_probabilities_have_funnel_shape_and_range(name: str, n_tasks: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, FIELDS, n_tasks)
    x, _ = random_batch(16, n_tasks)
    probs = model(x).probs
    assert probs.shape == (16, n_tasks)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()


@pytest.mark.parametrize("name", list_models())
def test_every_model_answers_an_empty_batch(name: str) -> None:
    """Zero rows in (an empty request, a stream's empty tail) give (0, N) probabilities in eval and training
    mode, and a zero gradient: no view of an empty tensor may leave a size to -1."""
    model, (x, _) = build_model(name, FIELDS, 3), random_batch(0, 3)
    with torch.no_grad():
        assert model.eval()(x).probs.shape == (0, 3)
    probs = model.train()(x).probs
    assert probs.shape == (0, 3)
    probs.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_loss_parts_stay_tensors_until_the_trainer_reads_them(name: str) -> None:
    """The loss and its parts are detached 0-dim tensors, not floats: the trainer sums them on the device and
    reads them once per epoch, since each float would make a GPU step wait for its kernels to finish."""
    model, (x, labels) = build_model(name, FIELDS, 3), random_batch(32, 3)
    total, parts = model.loss(model.train()(x), labels)
    assert "total" in parts
    for name_, value in parts.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name_
    assert float(parts["total"]) == pytest.approx(float(total.detach()))


@pytest.mark.parametrize("name", BASELINES)
def test_loss_decreases_over_a_few_steps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, FIELDS, 3)
    x, labels = random_batch(256, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # dropout off so the two measurements are comparable
    with torch.no_grad():
        before = float(model.loss(model(x), labels)[0])
    model.train()
    for step in range(25):
        model.set_training_progress(step)
        loss, parts = model.loss(model(x), labels)
        assert torch.isfinite(loss) and isinstance(parts, dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(model.loss(model(x), labels)[0])
    assert after < before * 0.95


def parameter_grads(output: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor | None]:
    return torch.autograd.grad(output, list(module.parameters()), retain_graph=True, allow_unused=True)


def is_zero(grads: list[torch.Tensor | None]) -> bool:
    return all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def tower_grads(output: torch.Tensor, towers: torch.nn.Module, task: int) -> list[torch.Tensor]:
    """The gradients of one task's slice of batched TaskTowers (every parameter is (N, ...))."""
    return [g[task] for g in parameter_grads(output, towers) if g is not None]


@pytest.mark.parametrize("n_levels", [1, 2])
def test_ple_task_specific_experts_are_invisible_to_other_tasks_gates(n_levels: int) -> None:
    torch.manual_seed(0)
    model = PLE(FIELDS, 3, PLE.Config(n_levels=n_levels, n_specific_experts=2, n_shared_experts=1))
    x, _ = random_batch(32, 3)
    probs = model(x).probs
    last = model.levels[-1]
    # each task gate chooses among its own specific experts and the shared ones, never others'
    assert [gate.out_features for gate in last.task_gates] == [2 + 1] * 3
    for task in range(3):
        for owner in range(3):
            grads = parameter_grads(probs[:, task].sum(), last.task_experts[owner])
            assert is_zero(grads) == (owner != task), (task, owner)
        assert not is_zero(parameter_grads(probs[:, task].sum(), last.shared_experts))
    if n_levels > 1:  # progressive extraction: lower-level specific experts reach all tasks via the shared gate
        first = model.levels[0]
        assert first.shared_gate.out_features == 3 * 2 + 1
        assert not is_zero(parameter_grads(probs[:, 2].sum(), first.task_experts[0]))


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_esmm_ctcvr_is_the_product_of_its_heads(n_tasks: int) -> None:
    torch.manual_seed(0)
    model = ESMM(FIELDS, n_tasks)
    x, _ = random_batch(16, n_tasks)
    output = model(x)
    ctr, cvr = output.aux["conditional"][:, 0], output.aux["conditional"][:, 1]
    torch.testing.assert_close(output.probs[:, 0], ctr)
    torch.testing.assert_close(output.probs[:, 1], ctr * cvr)
    if n_tasks == 3:
        torch.testing.assert_close(output.probs[:, 2], ctr * cvr * output.aux["conditional"][:, 2])
    assert (output.probs[:, 1:] <= output.probs[:, :-1]).all()


def test_aitm_calibrator_is_zero_for_monotone_outputs_and_penalises_violations() -> None:
    monotone = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.3, 0.0]])
    assert float(behavioral_expectation_calibrator(monotone)) == 0.0
    violating = torch.tensor([[0.2, 0.5, 0.1], [0.3, 0.1, 0.4]])
    # row 1: max(0.3, 0) + 0 = 0.3; row 2: 0 + 0.3 = 0.3; mean 0.3
    assert float(behavioral_expectation_calibrator(violating)) == pytest.approx(0.3)


def test_aitm_loss_adds_the_weighted_calibrator() -> None:
    torch.manual_seed(0)
    model = AITM(FIELDS, 3, AITM.Config(calibrator_weight=2.0)).eval()
    x, labels = random_batch(64, 3)
    output = model(x)
    total, parts = model.loss(output, labels)
    base, _ = super(AITM, model).loss(output, labels)
    expected = base + 2.0 * behavioral_expectation_calibrator(output.probs)
    torch.testing.assert_close(total, expected)
    assert "calibrator" in parts


def test_escm2_ips_weight_is_detached_from_the_propensity() -> None:
    propensity = torch.tensor([0.5, 0.001, 0.25], requires_grad=True)
    weight = inverse_propensity_weight(propensity, min_propensity=0.01)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, torch.tensor([2.0, 100.0, 4.0]))
    conditional = torch.tensor([0.4, 0.7, 0.2], requires_grad=True)
    risk = ips_risk(conditional, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]), propensity, 0.01)
    grad_propensity, grad_conditional = torch.autograd.grad(risk, [propensity, conditional], allow_unused=True)
    assert grad_propensity is None
    assert grad_conditional is not None and grad_conditional[2] == 0  # unobserved rows carry no error


@pytest.mark.parametrize("variant", ["ips", "dr"])
def test_escm2_counterfactual_risk_does_not_train_the_ctr_head(variant: str) -> None:
    torch.manual_seed(0)
    model = ESCM2(FIELDS, 2, ESCM2.Config(variant=variant))
    x, labels = random_batch(64, 2)
    output = model(x)
    counterfactual, parts = model.counterfactual_loss(output, labels)
    assert "counterfactual_1" in parts and (variant == "ips") != ("imputation_1" in parts)
    assert is_zero(tower_grads(counterfactual, model.towers, 0))  # CTR = propensity head
    assert not is_zero(tower_grads(counterfactual, model.towers, 1))  # CVR head
    if variant == "dr":
        assert not is_zero(parameter_grads(counterfactual, model.imputation))


def test_escm2_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant"):
        ESCM2(FIELDS, 2, ESCM2.Config(variant="xyz"))
