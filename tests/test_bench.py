"""bench.py's bookkeeping (the timings themselves need a GPU)."""
import pytest

from bench import path_shares
from degrade import ScaleSpace


@pytest.mark.parametrize("res,levels", [(64, 4), (256, 6), (32, 1)])
def test_path_shares_follow_the_batch_rule(res, levels):
    """Every path once, weighted by its share of batches under SPEC 2's rule: the shares sum to one."""
    ss = ScaleSpace(res, levels)
    shares = path_shares(ss)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert len(shares) == 2 * levels - 1  # one in-level path per level, one per resolution change
    assert all(shares[t] == pytest.approx(1 / ss.T) for t in ss.transitions)
    if levels == 4:  # level 0 holds steps 0..437: 438 of 1000
        assert shares[0] == pytest.approx(438 / 1000)
