"""The check the device tests use to say that the speaker played what the server sent
(:func:`tests.helpers.unplayed_pieces`): a rebuffering gap where the device ran dry passes, and
audio that was not played, or a gap the device did not report, does not. Pure, on synthetic speech."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import found_in, unplayed_pieces


@pytest.fixture(scope="module")
def sent() -> np.ndarray:
    from engine.server.voice import synthesize
    return np.asarray(synthesize("The capital of France is Paris.", "marin", 1.0), dtype=np.int16)


def played(sent: np.ndarray, gap_at: int | None = None, gap_frames: int = 2400) -> np.ndarray:
    """What a speaker monitor records: silence, ``sent``, silence, with a gap of ``gap_frames``
    silence at frame ``gap_at`` of ``sent``."""
    lead = np.zeros(7200, np.int16)
    body = sent if gap_at is None else np.concatenate([sent[:gap_at], np.zeros(gap_frames, np.int16), sent[gap_at:]])
    return np.concatenate([lead, body, lead])


def test_a_clean_playout_holds_every_piece(sent: np.ndarray) -> None:
    assert unplayed_pieces(played(sent), sent, gaps=0) == []
    corr, lag = found_in(played(sent), sent[6000:12000])
    assert corr > 0.99 and lag == 7200 + 6000


def test_a_short_part_is_found_where_it_is_not_where_the_recording_is_loudest(sent: np.ndarray) -> None:
    """Scored against the whole of ``recorded``'s energy, this part's peak was 9,000 frames early
    (0.64 there): the split of a piece across a gap then failed."""
    corr, lag = found_in(played(sent, 19800, 480), sent[18000:19800])
    assert corr > 0.99 and lag == 7200 + 18000


@pytest.mark.parametrize("gap_at", [4800, 13800, 20400, 33000])
@pytest.mark.parametrize("gap_frames", [480, 2400, 9600])
def test_a_gap_inside_a_piece_passes_only_where_the_device_ran_dry(sent: np.ndarray, gap_at: int,
                                                                    gap_frames: int) -> None:
    piece_first = gap_at // 6000 * 6000
    recorded = played(sent, gap_at, gap_frames)
    # the defect: the piece across the gap is not found whole (CI's run of 49e9d4e on 2026-12-07: 0.44)
    assert [first for first, _ in unplayed_pieces(recorded, sent, gaps=0)] == [piece_first]
    assert unplayed_pieces(recorded, sent, gaps=1) == []


def test_audio_that_was_not_played_fails_with_a_gap_allowed(sent: np.ndarray) -> None:
    first = 18000
    wrong = sent.copy()
    wrong[first:first + 6000] = np.random.default_rng(7).integers(-8000, 8000, 6000, dtype=np.int16)
    assert [f for f, _ in unplayed_pieces(played(wrong), sent, gaps=1)] == [first]
    # two gaps, one allowed: the second piece across a gap is named
    second = 30000
    twice = np.concatenate([sent[:first + 3000], np.zeros(2400, np.int16), sent[first + 3000:second + 3000],
                            np.zeros(2400, np.int16), sent[second + 3000:]])
    assert [f for f, _ in unplayed_pieces(twice, sent, gaps=1)] == [second]
