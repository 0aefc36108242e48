"""The Ranks table's row for one rank fits its columns, whatever the numbers' size: a trained
model's loss near 0 (2.92e-05) pushed the row onto a second line at 120 columns."""

from __future__ import annotations

import pytest

from loopscope.shared.events import StageEvent
from loopscope.shared.vocab import Stage
from loopscope.ui.panels.ranks import RANK_COLUMNS, RANKS_HEADER, _cells


@pytest.mark.parametrize(
    ("loss", "local", "reduced"), [(1.0748, 0.4031, 0.325), (2.92e-05, 0.002137, 0.002414), (12345.6, 3.1e12, 1e-100)]
)
def test_each_cell_fits_its_column(loss, local, reduced):
    stages = {
        "load_batch": StageEvent(3, 1, Stage.LOAD_BATCH, metrics={"batch_fingerprint": "474edbb6"}, rank=1),
        "loss": StageEvent(3, 1, Stage.LOSS, loss=loss, rank=1),
        "backward": StageEvent(
            3,
            1,
            Stage.BACKWARD,
            grad_norm=reduced,
            metrics={"local_grad_norm": local, "all_reduces": 1, "comm_ms": 0.71},
            rank=1,
        ),
        "step": StageEvent(3, 1, Stage.STEP, metrics={"param_checksum": "e9b74371"}, rank=1),
    }
    cells = _cells(stages)
    assert [len(value) <= width for value, _, width in cells] == [True] * len(cells), cells
    row = " ".join(value.rjust(width) for value, _, width in [("1", None, RANK_COLUMNS[0][1]), *cells])
    assert len(row) == len(RANKS_HEADER) <= 52
    assert cells[1][0] != "-" and float(cells[1][0]) == pytest.approx(loss, rel=0.05)
