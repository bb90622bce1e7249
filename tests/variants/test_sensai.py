"""The class-parallel baseline: the reference rebuilt from its ONNX, pruning, the group
targets and vote, and the shipped sub-models on held-out images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.variants.conftest import needs_torch
from variants import data, runtime
from variants.sensai import (
    GROUPINGS,
    SUBNETS_DIR,
    Grouping,
    combine,
    group_labels,
    group_targets,
    reference_path,
)


@pytest.fixture(scope="module")
def held_out() -> data.Split:
    test = data.load_split("test")
    return data.Split(test.images[:200], test.labels[:200])


def test_group_targets_and_labels_collapse_the_rest_into_other() -> None:
    probs = np.array([[0.1, 0.2, 0.3, 0.05, 0.05, 0.1, 0.1, 0.05, 0.025, 0.025]])
    got = group_targets(probs, (2, 0))
    assert got.shape == (1, 3)
    assert got[0, 0] == pytest.approx(0.3) and got[0, 1] == pytest.approx(0.1)
    assert got.sum() == pytest.approx(1.0)
    assert list(group_labels(np.array([2, 0, 7]), (2, 0))) == [0, 1, 2]


def test_combine_answers_the_class_of_the_most_confident_group() -> None:
    groups = ((0, 1), (2,))
    a = np.array([[0.6, 0.1, 0.3], [0.2, 0.1, 0.7]])  # classes 0, 1, other
    b = np.array([[0.2, 0.8], [0.9, 0.1]])  # class 2, other
    assert list(combine([a, b], groups).argmax(1)) == [0, 2]


def test_groupings_cover_every_class_once() -> None:
    for grouping in GROUPINGS:
        assert sorted(c for g in grouping.groups for c in g) == list(range(10))
    with pytest.raises(ValueError, match="must cover"):
        Grouping("bad", ((0, 1), (1, 2)), keep=0.5)


@needs_torch
def test_reference_rebuilt_from_onnx_matches_it(held_out: data.Split) -> None:
    import torch

    from variants.prune import reference_from_onnx, with_reference_statistics

    x = held_out.as_float()[:64]
    want = runtime.predict(reference_path(), x)
    model = reference_from_onnx(reference_path())
    with torch.no_grad():
        got = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    assert np.abs(got - want).max() < 1e-4
    # Moving the statistics into the BatchNorms leaves the function as it was.
    model = with_reference_statistics(model, torch.from_numpy(held_out.as_float()[64:]))
    with torch.no_grad():
        again = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    assert np.abs(again - want).max() < 1e-4


@needs_torch
def test_pruning_keeps_fewer_channels_and_a_group_head(held_out: data.Split) -> None:
    import torch

    from variants.models import count_macs, count_params
    from variants.prune import (
        PruneError,
        channel_stats,
        prune,
        reference_from_onnx,
        with_reference_statistics,
    )

    x = torch.from_numpy(held_out.as_float())
    ref = with_reference_statistics(reference_from_onnx(reference_path()), x[:100])
    stats = channel_stats(ref, x[:50], x[50:100])
    whole = prune(ref, stats, 1.0, (3, 5), x[:100])
    half = prune(ref, stats, 0.5, (3, 5), x[:100])
    assert count_params(half) < 0.6 * count_params(ref)
    assert count_macs(half) < 0.6 * count_macs(ref)
    with torch.no_grad():
        assert half(x[:4]).shape == (4, 3)
        # Nothing pruned: the class rows are the reference's logits (up to re-estimated
        # statistics).
        assert torch.allclose(whole.eval()(x[:8])[:, :2], ref(x[:8])[:, [3, 5]], atol=5e-3)
    with pytest.raises(PruneError, match="keep fraction"):
        prune(ref, stats, 0.0, (3,), None)
    with pytest.raises(PruneError, match="distinct classes"):
        prune(ref, stats, 0.5, (3, 3), None)


def _shipped() -> dict[str, object]:
    path = SUBNETS_DIR / "manifest.json"
    if not path.exists():
        pytest.skip("no sub-models exported (python -m variants.sensai)")
    return dict(json.loads(path.read_text()))


def test_shipped_submodels_and_their_vote_on_held_out_images(held_out: data.Split) -> None:
    """Each grouping's sub-models answer their group and the vote classifies well."""
    manifest = _shipped()
    groupings = manifest["groupings"]
    assert isinstance(groupings, list) and groupings
    x = held_out.as_float()
    for grouping in groupings:
        outs = []
        for member in grouping["members"]:
            probs = runtime.predict(SUBNETS_DIR / member["file"], x)
            group = tuple(member["classes"])
            assert probs.shape == (len(x), len(group) + 1)
            assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
            own = (probs.argmax(1) == group_labels(held_out.labels, group)).mean()
            assert own > 0.8, (member["name"], own)
            outs.append(probs)
        groups = tuple(tuple(m["classes"]) for m in grouping["members"])
        accuracy = (combine(outs, groups).argmax(1) == held_out.labels).mean()
        assert accuracy > 0.75, (grouping["name"], accuracy)
