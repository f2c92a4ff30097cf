"""Several `--data` sources for one build (toolchain.build.data.load_sources): the original
data joined with what the fleet captured, as they are or in a seeded mix. No training here;
tests/test_ingest.py builds with them."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.build.data import load_data, load_sources
from toolchain.errors import UsageError


def captured(path, n: int = 120, classes: int = 9, seed: int = 3, shape=(1, 32, 32)):
    """An export of `toolchain dataset export`'s form: inverted digits of the first `classes`
    classes (a capture rarely sees every class), with the export's extra arrays."""
    rng = np.random.default_rng(seed)
    digits = load_data("digits", 0)
    keep = np.flatnonzero(digits.y_test < classes)[:n]
    x = (digits.x_test.max() - digits.x_test[keep]).astype(np.float32)
    if shape != (1, 32, 32):
        x = rng.random((len(keep), *shape), dtype=np.float32)
    y = digits.y_test[keep]
    np.savez(path, x=x, y=y, labels=np.asarray([str(i) for i in range(int(y.max()) + 1)]),
             label_source=np.zeros(len(y), np.uint8),
             device_id=np.asarray(["cam-1"] * len(y)),
             inference_id=np.asarray([f"s-{i}" for i in range(len(y))]))
    return path


def test_two_sources_join_each_split_on_its_own(tmp_path):
    fresh = captured(tmp_path / "fresh.npz")
    alone = load_data("digits", 0)
    both = load_sources(["digits", str(fresh)], 0)
    n_fresh = 120
    assert len(both.x_train) + len(both.x_val) + len(both.x_test) == 1797 + n_fresh
    # the first source is split as it is alone; the second is in every split
    np.testing.assert_array_equal(both.x_train[:len(alone.x_train)], alone.x_train)
    assert len(both.x_val) > len(alone.x_val) and len(both.x_test) > len(alone.x_test)
    assert both.labels == alone.labels and both.sample_shape == (1, 32, 32)
    assert both.name == f"digits + {fresh}" and "from the other 1 source(s)" in both.describe()
    # provenance: every source's arrays hashed together, and the order matters
    assert both.sha256 != alone.sha256
    assert load_sources([str(fresh), "digits"], 0).sha256 != both.sha256
    assert load_sources(["digits"], 0).sha256 == alone.sha256  # one source: as before


def test_mix_draws_its_share_of_training_from_the_later_sources_with_the_seed(tmp_path):
    fresh = captured(tmp_path / "fresh.npz")
    alone = load_data("digits", 0)
    first, first_val = len(alone.x_train), len(alone.x_val)
    for mix in (0.3, 0.6):  # 0.6 asks for more than there is: drawn with replacement
        data = load_sources(["digits", str(fresh)], 0, mix=mix)
        drawn = len(data.x_train) - first
        assert abs(drawn / len(data.x_train) - mix) < 0.01, (mix, drawn)
        # validation (the drift reference's data) is mixed alike; test keeps every source
        drawn_val = len(data.x_val) - first_val
        assert abs(drawn_val / len(data.x_val) - mix) < 0.02, (mix, drawn_val)
        np.testing.assert_array_equal(data.x_val[:first_val], alone.x_val)
        assert f"--mix {mix:g}" in data.describe() and f"(mix {mix:g}, seed 0)" in data.name
    a, b = (load_sources(["digits", str(fresh)], s, mix=0.3) for s in (0, 0))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    c = load_sources(["digits", str(fresh)], 1, mix=0.3)
    assert a.sha256 != load_sources(["digits", str(fresh)], 0, mix=0.4).sha256
    assert not np.array_equal(a.y_train, c.y_train)


def test_sources_that_do_not_fit_together_are_usage_errors(tmp_path):
    other_shape = captured(tmp_path / "big.npz", shape=(1, 16, 16))
    with pytest.raises(UsageError, match=r"samples of shape \(1, 16, 16\), but 'digits' has "
                                         r"\(1, 32, 32\); every --data source needs the same"):
        load_sources(["digits", str(other_shape)], 0)
    named = tmp_path / "named.npz"
    np.savez(named, x=np.zeros((6, 1, 32, 32), np.float32), y=np.arange(6) % 2,
             labels=np.asarray(["cat", "dog"]))
    # digits names its classes by index, so they are read as [cat, dog]'s, of which it has
    # too many
    with pytest.raises(UsageError, match=r"classes \[0, 1, 2.*\(10\) do not match \[cat, dog\]"):
        load_sources(["digits", str(named)], 0)
    with pytest.raises(UsageError, match="--mix 0.5: .* a second --data source"):
        load_sources(["digits"], 0, mix=0.5)
    with pytest.raises(UsageError, match="--mix 1: give a share between 0 and 1"):
        load_sources(["digits", str(named)], 0, mix=1.0)


def test_an_export_names_classes_by_index_and_joins_named_data(tmp_path):
    named = tmp_path / "named.npz"
    rng = np.random.default_rng(0)
    np.savez(named, x=rng.random((30, 1, 8, 8), dtype=np.float32), y=np.arange(30) % 3,
             labels=np.asarray(["cat", "dog", "owl"]))
    export = tmp_path / "export.npz"  # what `toolchain dataset export` writes: indices
    np.savez(export, x=rng.random((12, 1, 8, 8), dtype=np.float32), y=np.arange(12) % 2,
             labels=np.asarray(["0", "1"]))
    both = load_sources([str(named), str(export)], 0)
    assert both.labels == ["cat", "dog", "owl"]
    assert len(both.x_train) + len(both.x_val) + len(both.x_test) == 42


def test_a_later_source_may_hold_classes_of_one_or_two_samples(tmp_path):
    """Captured data rarely has three samples of every class: those go to training."""
    few = tmp_path / "few.npz"
    np.savez(few, x=np.ones((5, 1, 32, 32), np.float32), y=np.asarray([0, 0, 0, 1, 2]))
    data = load_sources(["digits", str(few)], 0)
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 1797 + 5
    with pytest.raises(UsageError, match="classes 1, 2 have fewer than 3 samples"):
        load_sources([str(few), "digits"], 0)
