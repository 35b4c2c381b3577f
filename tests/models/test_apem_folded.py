"""Each path of :class:`apem.models.apem_folded.FoldedAPEM` predicts what ``APEM.forward`` predicts, to 1e-5:
the exp-free binary path (z exactly 0/1), its exact fix-ups of fractional z entries, the general path
(gamma not annealed, or exp tables refused), both ``deselected_point`` readings, with and without task
indicators, on random weights and on a model trained to gamma's floor, through predict() and a model dir;
and the skipping of points no row of a chunk selects, with rows that select none or all K points."""

import pytest
import torch

from apem.data.encoding import FeatureEncoder, FieldSpec
from apem.data.features import default_spec
from apem.data.spec import Dataset, write_dataset
from apem.inference.calibration import recalibrate
from apem.inference.model_dir import load_model, save_model
from apem.inference.predict import predict
from apem.models.apem_folded import MAX_FRACTIONAL_SHARE, FoldedAPEM
from apem.models.apem_model import APEM
from apem.models.registry import build_model
from apem.research.synth import SynthConfig, generate
from apem.train.trainer import TrainConfig, encode_dataset, fit

torch.set_num_threads(1)
FIELDS = [FieldSpec(f"f{i}", 5 + 3 * i) for i in range(6)]
READINGS = ["uniform_attention", "contributes_nothing"]


@pytest.fixture(autouse=True)
def _lookup_tables(monkeypatch):
    """Predict takes the lookup tables only without the C kernels (with them, the model itself is faster)."""
    monkeypatch.setenv("APEM_NATIVE_KERNELS", "0")


def _model(reading: str, task_indicators: bool = True, seed: int = 0) -> APEM:
    torch.manual_seed(seed)
    model = APEM(FIELDS, 3, APEM.Config(embed_dim=6, heads=2, inducing_points=8, layers=3, gamma_schedule="planned",
                                        deselected_point=reading, task_indicators=task_indicators))
    with torch.no_grad():  # non-zero biases and norm affines, so their folding is exercised
        for p in (model.asrg.attention.b_value, model.asrg.attention.b_out, model.asrg.norm.bias):
            p.normal_(0, 0.5)
        model.asrg.norm.weight.normal_(1, 0.3)
    model.set_training_progress(1000, 1000)  # gamma at its floor: z is binary
    return model.eval()


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in FIELDS], dim=1)


def _fractional_share(model: APEM, x: torch.Tensor) -> float:
    with torch.no_grad():
        z = model.selector_mask(model.embedding(x))
    return float(((z > 0) & (z < 1)).float().mean())


def _set_gamma_for_share(model: APEM, x: torch.Tensor, share: float) -> None:
    """Put gamma where about ``share`` of the z entries fall inside f_D's smooth part (|logit| < gamma / 2)."""
    with torch.no_grad():
        logits = model.selector(model.embedding(x).flatten(1)).abs().flatten()
        model.gamma.fill_(2 * float(logits.quantile(share)))


def _assert_matches_reference(model: APEM, x: torch.Tensor, **folded) -> FoldedAPEM:
    fast = FoldedAPEM(model, **folded)
    with torch.inference_mode():
        expected, got = model(x).probs, fast(x).probs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert expected.std(dim=0).min() > 1e-4  # not a constant model, where any path would agree
    return fast


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("task_indicators", [True, False])
@pytest.mark.parametrize("share", [0.0, 0.01, 0.5])  # binary, binary with fix-ups, the general path
def test_every_path_matches_the_reference_on_random_weights(reading, task_indicators, share):
    model, x = _model(reading, task_indicators), _inputs(700)
    if share:
        _set_gamma_for_share(model, x, share)
    else:  # so sharp that no logit falls in f_D's smooth part
        model.gamma.fill_(1e-12)
    measured = _fractional_share(model, x)
    assert (measured == 0) == (share == 0) and (measured > MAX_FRACTIONAL_SHARE) == (share > MAX_FRACTIONAL_SHARE)
    fast = _assert_matches_reference(model, x, chunk_rows=256)  # 700 rows: three chunks, the last short
    assert fast.exp_tables is not None


def _select_by_rule(model: APEM, x: torch.Tensor) -> torch.Tensor:
    """Rewrite the selector's last layer: in layer 0 a row selects all K points or none (about half each),
    layer 1 selects every point in every row, layer 2 none in any row; returns layer 0's selection per row."""
    final, k = model.selector.net[-1], model.config.inducing_points
    with torch.no_grad():
        hidden = model.selector.net[:-1](model.embedding(x).flatten(1))
        unit = int(hidden.std(dim=0).argmax())
        ordered = hidden[:, unit].sort().values
        split = float(ordered[len(x) // 2:].unique()[:2].mean())  # between two distinct values: no logit is 0
        final.weight.zero_()
        final.weight[:k, unit] = 1.0
        final.bias[:k], final.bias[k:2 * k], final.bias[2 * k:] = -split, 1.0, -1.0
        model.gamma.fill_(1e-12)
        return hidden[:, unit] > split


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("task_indicators", [True, False])
@pytest.mark.parametrize("chunk_rows", [8, 256])  # 8: lookups compacted (6 x 8 < 75 table rows); 256: table columns
def test_rows_with_no_or_every_point_selected_and_skipped_points_match_the_reference(reading, task_indicators,
                                                                                     chunk_rows):
    model, x = _model(reading, task_indicators), _inputs(240)
    all_selected = _select_by_rule(model, x)
    assert 0.3 < float(all_selected.float().mean()) < 0.7 and _fractional_share(model, x) == 0
    fast = _assert_matches_reference(model, x, chunk_rows=chunk_rows)
    nothing_used = torch.zeros(model.config.inducing_points, dtype=torch.bool)  # layer 2: no row selects a point
    columns, z, row_weights = fast._chunk_points(torch.zeros(4, model.config.inducing_points), nothing_used)
    if reading == "uniform_attention":  # one de-selected point and the slot standing for the other K - 1
        assert columns.tolist() == [0, 0] and row_weights.tolist() == [[1.0, model.config.inducing_points - 1]]
    else:
        assert columns.tolist() == [0] and not z.any()


@pytest.mark.parametrize("reading", READINGS)
def test_exp_tables_refused_when_a_column_would_underflow(reading):
    model, x = _model(reading), _inputs(300)
    with torch.no_grad():
        model.asrg.inducing.mul_(400.0)  # score columns far wider than float32's exp range
    assert _assert_matches_reference(model, x).exp_tables is None


@pytest.fixture(scope="module", params=READINGS)
def saved(request, tmp_path_factory):
    """APEM trained on synthetic funnel rows to gamma's floor (planned schedule), saved as a model dir."""
    root = tmp_path_factory.mktemp("folded")
    table, _ = generate(SynthConfig(rows=3_000, days=4, seed=5))
    spec = default_spec()
    train = Dataset(spec, table.slice(0, 2_000))
    write_dataset(table.slice(2_000), spec, str(root / "test"))
    encoder = FeatureEncoder(spec).fit(train)
    torch.manual_seed(0)
    model = build_model("apem", encoder.fields, 3, {"inducing_points": 8, "layers": 2, "gamma_schedule": "planned",
                                                    "deselected_point": request.param})
    fit(model, encode_dataset(train, encoder), None, TrainConfig(epochs=2, batch_size=256, lr=1e-2, progress=False))
    assert model.schedule_settled()
    out = save_model(str(root / "model"), model, encoder, spec, extra_meta={"negative_rate": 0.5})
    return root, out, model.eval(), encoder, table.slice(2_000)


def test_trained_model_predicts_the_reference_through_predict_and_the_model_dir(saved):
    root, out, model, encoder, test_table = saved
    x = torch.from_numpy(encoder.transform(test_table))
    assert _fractional_share(model, x) <= MAX_FRACTIONAL_SHARE  # the binary path, with any fix-ups
    assert isinstance(model.inference_module(len(x)), FoldedAPEM)
    with torch.inference_mode():
        reference, fast = model(x), model.inference_module(len(x))(x)
    expected = reference.probs.numpy()
    assert reference.aux["logits"].std(dim=0).min() > 5e-3  # not constant: 50x the tolerance below
    torch.testing.assert_close(fast.aux["logits"], reference.aux["logits"], atol=1e-4, rtol=1e-5)
    assert abs(predict(model, x, batch_size=600) - expected).max() < 1e-5
    probs, dataset = load_model(out).predict_dataset(str(root / "test"), scoring=True)
    assert len(dataset.table) == len(x) and abs(probs - recalibrate(expected, 0.5)).max() < 1e-5


def test_predict_on_two_threads_matches_and_restores_the_thread_count(saved):
    _, _, model, encoder, test_table = saved
    x = torch.from_numpy(encoder.transform(test_table))
    one = predict(model, x, batch_size=128)
    torch.set_num_threads(2)
    try:
        two = predict(model, x, batch_size=128)  # batches side by side on two single-threaded workers
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert abs(one - two).max() < 1e-6
