"""``swarm.decision.voting`` against an independent numpy implementation of its rules
(``tests.swarm.legacy_voting``), on random ballots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.decision import voting
from swarm.errors import NoDecisionError
from tests.swarm import legacy_voting
from tests.swarm.test_voting import ballots_strategy


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    num_classes=st.integers(2, 10),
    rule=st.sampled_from(voting.RULES),
    missing=st.integers(0, 4),
)
def test_numpy_oracle_decides_as_the_vote(
    data: st.DataObject, num_classes: int, rule: str, missing: int
) -> None:
    """The numpy oracle decides exactly as ``swarm.decision.voting``: label, scores,
    certificate and early exit, bit for bit."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    old = [legacy_voting.Ballot(x.peer_id, x.variant, x.topk, x.weight) for x in ballots]
    try:
        new_d = voting.decide(ballots, rule, num_classes=num_classes)
    except NoDecisionError:
        with pytest.raises(NoDecisionError):
            legacy_voting.decide(old, rule, num_classes=num_classes)
        return
    old_d = legacy_voting.decide(old, rule, num_classes=num_classes)
    assert (new_d.label, new_d.certified_f, new_d.used) == (
        old_d.label,
        old_d.certified_f,
        old_d.used,
    )
    assert new_d.scores == old_d.scores
    assert (new_d.margin, new_d.confidence) == (old_d.margin, old_d.confidence)
    assert voting.can_change(ballots, missing, rule, num_classes=num_classes) == (
        legacy_voting.can_change(old, missing, rule, num_classes=num_classes)
    )
