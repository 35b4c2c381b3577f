"""Issue 9's fast paths predict what APEM's reference path predicts, to 1e-5: the distinct-rows training
path (outputs and gradients), the C kernels (apem.nn.native_pools) and the predict-time lookup tables
(:class:`apem.models.apem_model.FoldedAPEM`, which predict takes without the kernels), on random weights and
on a trained model."""

import copy

import pytest
import torch

from apem.data.encoding import FieldSpec
from apem.inference.predict import predict, predict_stream
from apem.models.apem_model import APEM, FoldedAPEM, KernelInference
from apem.nn.attention import computed_points
from apem.nn.selection import kept_by_batch
from apem.train.trainer import EncodedData, TrainConfig, fit

torch.set_num_threads(1)
FIELDS = [FieldSpec(f"f{i}", 5 + 3 * i) for i in range(6)]
READINGS = ["uniform_attention", "contributes_nothing"]


def _model(step: int, **overrides) -> APEM:
    torch.manual_seed(0)
    config = dict(embed_dim=6, heads=2, inducing_points=8, layers=3, gamma_schedule="planned")
    model = APEM(FIELDS, 3, APEM.Config(**{**config, **overrides}))
    with torch.no_grad():  # non-zero value/output biases, so their folding is exercised
        for p in (model.asrg.attention.b_value, model.asrg.attention.b_out):
            p.normal_(0, 0.5)
    model.set_training_progress(step, 1000)
    return model


def _inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in FIELDS], dim=1)


def _use_reference(model: APEM) -> APEM:
    """The same model on the default all-layers-in-one-GEMM ASRG path, without predict-time tables."""
    model.inference_module = lambda rows=None: model
    return model


@pytest.mark.parametrize("step", [0, 450, 600])  # soft mask (gamma 10, ~1) and the binary floor
@pytest.mark.parametrize("reading", READINGS)
def test_distinct_rows_training_path_matches_the_direct_path(step, reading):
    """The default training forward (ASRG over the batch's distinct embedding rows) against
    ``gather_fields=False`` (every field row through the GEMMs): outputs and all gradients."""
    model = _model(step, deselected_point=reading)
    direct = copy.deepcopy(model)
    direct.config.gather_fields = False
    assert model.gathers_fields() and not direct.gathers_fields()
    x, labels = _inputs(), (torch.rand(64, 3) < 0.3).float()
    outputs = []
    for m in (model, direct):
        output = m(x)
        m.loss(output, labels)[0].backward()
        outputs.append(output.probs)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), direct.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kept_points, uniform, columns, counts", [
    (range(20), True, list(range(20)), [1.0] * 20),                       # nothing dropped: every point, as is
    (range(0, 20, 2), True, list(range(0, 20, 2)) + [1] * 6, [1.0] * 10 + [10.0] + [0.0] * 5),
    (range(0, 20, 2), False, list(range(0, 20, 2)) + [1] * 6, [1.0] * 10 + [0.0] * 6),
    (range(19), True, list(range(20)), [1.0] * 19 + [1.0]),                # padding stops at K
    ([], True, [0] * 8, [20.0] + [0.0] * 7),                               # none kept: the shared row alone
    ([], False, [], []),                                                   # none kept, none needed
])
def test_computed_points(kept_points, uniform, columns, counts):
    """A layer's columns: the kept points, then (uniform reading) one dropped point weighing K - P, then dropped
    points of weight 0 up to a multiple of 8 or K."""
    kept = torch.zeros(20, dtype=torch.bool)
    kept[list(kept_points)] = True
    got_columns, got_counts = computed_points(kept, uniform)
    assert got_columns.tolist() == columns and got_counts.tolist() == counts


@pytest.mark.parametrize("reading", READINGS)
def test_training_over_the_kept_points_matches_the_reference(reading):
    """Once f_D drops points, training computes per layer only the points some row of the batch keeps
    (:meth:`APEM.kept_pattern_pool`). Against the direct path (every field row, all K points) and the distinct-rows
    path over all K points: outputs and all gradients. The selector's biases make layer 0 keep every point, layer 1
    about half, layer 2 none, with K = 20 (not a multiple of the kernels' 8)."""
    model = _model(600, deselected_point=reading, inducing_points=20)
    with torch.no_grad():
        bias = model.selector.net[-1].bias.view(3, 20)
        bias[0], bias[1, ::2], bias[2] = 50.0, -50.0, -50.0
    x, labels = _inputs(), (torch.rand(64, 3) < 0.3).float()
    rows, index = model.embedding.distinct_rows(x)
    logits = model.selector_logits(torch.nn.functional.embedding(index, rows))
    assert model.kept_pattern_pool(rows, index, logits) is not None  # the path under test runs
    assert kept_by_batch(logits, model.gamma).sum(1).tolist()[::2] == [20, 0]
    direct, all_points = copy.deepcopy(model), copy.deepcopy(model)
    direct.config.gather_fields = False
    all_points.kept_pattern_pool = lambda *args: None
    results = []
    for m in (model, direct, all_points):
        output = m(x)
        m.loss(output, labels)[0].backward()
        results.append((output.probs, [p.grad for p in m.parameters()]))
    names = [name for name, _ in model.named_parameters()]
    for probs, grads in results[1:]:
        torch.testing.assert_close(results[0][0], probs, atol=1e-5, rtol=0)
        for name, grad, expected in zip(names, results[0][1], grads):
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("step", [0, 450, 600])
@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("task_indicators", [True, False])
def test_lookup_tables_match_the_reference_on_random_weights(monkeypatch, step, reading, task_indicators):
    monkeypatch.setenv("APEM_NATIVE_KERNELS", "0")  # without the C kernels, predict takes the tables
    model = _model(step, task_indicators=task_indicators, deselected_point=reading).eval()
    fast = model.inference_module()
    assert isinstance(fast, FoldedAPEM)
    x = _inputs(256)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x).probs, _use_reference(model)(x).probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "lookup-tables"])
@pytest.mark.parametrize("reading", READINGS)
def test_every_fast_path_matches_the_reference_on_a_trained_model(monkeypatch, reading, kernels):
    """Train a tiny APEM a few steps to its binary floor, then predict through the model's C kernels or,
    without them, the lookup tables; the reference is the model itself on the torch path."""
    torch.manual_seed(0)
    x = _inputs(2048, seed=2)
    y = (torch.rand(2048, 1) < 0.3 + 0.4 * (x[:, :1] % 2)).float().expand(-1, 3).cumprod(dim=1).contiguous()
    model = APEM(FIELDS, 3, APEM.Config(embed_dim=6, heads=2, inducing_points=8, layers=3, deselected_point=reading,
                                        gamma_schedule="planned"))
    fit(model, EncodedData(x, y), None, TrainConfig(epochs=2, batch_size=256, lr=1e-2, progress=False, device="cpu"))
    assert model.schedule_settled()
    test_x = _inputs(1000, seed=3)
    monkeypatch.setenv("APEM_NATIVE_KERNELS", kernels)
    assert type(model.eval().inference_module(len(test_x))) is (KernelInference if kernels == "1" else FoldedAPEM)
    if kernels == "1":  # the model predicts through the fused inference kernel, not its training path
        with torch.inference_mode():
            rows, index = model.embedding.distinct_rows(test_x)
            logits = model.selector_logits(torch.nn.functional.embedding(index, rows))
            assert model.fused_pattern_pool(rows, index, logits) is not None
    fast = predict(model, test_x, batch_size=300)  # through inference_module()
    monkeypatch.setenv("APEM_NATIVE_KERNELS", "0")
    reference = predict(_use_reference(model), test_x, batch_size=300)
    assert abs(fast - reference).max() < 1e-5
    assert fast.std(axis=0).min() > 1e-3  # the trained model is not constant


def test_predict_scores_rows_sharing_embedding_rows_together_and_answers_in_the_inputs_order():
    """On the kernel path predict sorts each chunk by the field of the most categories (row_order), so that a batch's
    rows share more embedding rows, and puts the predictions back in the input's order: the same as the model on
    the whole input at once, whole or streamed in chunks."""
    model, x = _model(600).eval(), _inputs(1000, seed=4)
    order = model.row_order(x)
    widest = max(range(len(FIELDS)), key=lambda f: FIELDS[f].cardinality)
    assert bool((x[order, widest].diff() >= 0).all()) and not bool((order == torch.arange(len(x))).all())
    with torch.inference_mode():
        expected = model(x).probs.numpy()  # one batch, in the input's order
    assert abs(predict(model, x, batch_size=128) - expected).max() < 1e-5
    chunks = [x[:400], x[400:]]
    assert abs(predict_stream(model, chunks, rows=len(x), batch_size=128) - expected).max() < 1e-5


def test_kernel_inference_takes_the_weights_products_once_per_prediction(monkeypatch):
    """predict's module on the kernel path folds the weights once, not per batch, and predicts as the model does."""
    model, x = _model(600).eval(), _inputs(1000, seed=5)
    folds = []
    folded_weights = model.asrg.folded_weights
    monkeypatch.setattr(model.asrg, "folded_weights", lambda *a: folds.append(1) or folded_weights(*a))
    with torch.inference_mode():
        expected = model(x).probs.numpy()
    assert len(folds) == 1
    assert abs(predict(model, x, batch_size=128) - expected).max() < 1e-6  # 8 batches
    assert len(folds) == 2


def test_inference_module_only_in_eval_mode_with_fields_input(monkeypatch):
    assert _model(0).train().inference_module().__class__ is APEM
    assert _model(0, layer_input="previous").eval().inference_module().__class__ is APEM
    few_rows = -(-sum(f.cardinality for f in FIELDS) // len(FIELDS)) - 1  # tables would cost more than they save
    assert _model(0).eval().inference_module(few_rows).__class__ is APEM
    # the C kernels (faster than tables), with the weights' products taken once; without task indicators there are
    # none to take
    assert _model(0).eval().inference_module(few_rows + 1).__class__ is KernelInference
    assert _model(0, task_indicators=False).eval().inference_module(few_rows + 1).__class__ is APEM
    monkeypatch.setenv("APEM_NATIVE_KERNELS", "0")
    assert _model(0).eval().inference_module(few_rows + 1).__class__ is FoldedAPEM
    # the tables are a CPU structure (built with CPU tensors); any other device ("meta" stands in for a GPU here,
    # which CI has none of) predicts through the model itself
    assert _model(0).to("meta").eval().inference_module(few_rows + 1).__class__ is APEM
    without_asrg = APEM(FIELDS, 3, APEM.Config(embed_dim=6, inducing_points=8, layers=3, dynamic_activation=False))
    assert without_asrg.eval().inference_module() is without_asrg


def test_dense_numericals_predict_through_the_model_itself() -> None:
    """dense_log inputs carry value columns after the F index columns; the lookup tables cover only
    table rows, so such a model must predict through its own forward (and give the same numbers)."""
    torch.manual_seed(0)
    fields = FIELDS[:-1] + [FieldSpec("balance", 7, dense=True)]
    model = APEM(fields, 3, APEM.Config(inducing_points=8, layers=2)).eval()
    indices = torch.stack([torch.randint(0, f.cardinality, (4096,)) for f in fields], dim=1)
    values = torch.randint(-50_000, 50_000, (4096, 1))  # the encoder's fixed-point signed_log column
    x = torch.cat([indices, values], dim=1)
    assert model.inference_module(rows=len(x)) is model
    with torch.no_grad():
        expected = model(x).probs.numpy()
    torch.testing.assert_close(torch.from_numpy(predict(model, x)), torch.from_numpy(expected))


@pytest.mark.parametrize("step", [0, 600])  # every point computed, and the kept points only (gamma at its floor)
@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch"])
def test_an_empty_batch_gives_no_rows_in_every_mode(monkeypatch, step, reading, kernels):
    """A request of zero rows (an empty frame to the served model, the tail of a stream) is answered with
    (0, N) probabilities, in eval and training mode, on every path (the lookup tables where the kernels do not
    run); its loss's gradient is zero."""
    monkeypatch.setenv("APEM_NATIVE_KERNELS", kernels)
    model, empty = _model(step, deselected_point=reading), _inputs(0)
    with torch.no_grad():
        assert model.eval()(empty).probs.shape == (0, 3)
        fast = model.eval().inference_module()
        assert isinstance(fast, FoldedAPEM) == (kernels == "0")
        assert fast(empty).probs.shape == (0, 3)
    output = model.train()(empty)
    assert output.probs.shape == (0, 3)
    output.probs.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
