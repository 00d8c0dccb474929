"""panoptic_segformer.d2.training_breakdown (tools/benchmark_peers.py --breakdown) on a
two-stage toy: what each stage holds for backward, its peak memory from the profiler, and the rows of the backward pass and the optimizer step.
"""

import pytest
import torch
from torch import nn

from panoptic_segformer.d2 import training_breakdown

ROWS, COLUMNS = 1000, 256  # x; the first stage's output has 4 x COLUMNS columns
FLOAT = 4


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(COLUMNS, 4 * COLUMNS)
        self.b = nn.ReLU()

    def forward(self, batch):
        return {"loss": self.b(self.a(batch[0])).sum()}


@pytest.fixture
def breakdown():
    return training_breakdown


def test_held_for_backward_by_stage(breakdown):
    torch.manual_seed(0)
    toy = Toy()
    x = torch.randn(ROWS, COLUMNS)
    stages = [("a", toy.a, "between"), ("b", toy.b, None)]
    with breakdown.StageRecorder(stages, list(toy.parameters())) as recorder:
        toy([x])["loss"].backward()
    assert recorder.order == ["other", "a", "between", "b"]
    # the linear layer keeps its input (its weight is a parameter, left out); the ReLU its output
    assert dict(recorder.held) == {"a": ROWS * COLUMNS * FLOAT, "b": 4 * ROWS * COLUMNS * FLOAT}
    assert recorder.held_by_shape == {
        ("a", (ROWS, COLUMNS), "float32"): [1, ROWS * COLUMNS * FLOAT],
        ("b", (ROWS, 4 * COLUMNS), "float32"): [1, 4 * ROWS * COLUMNS * FLOAT],
    }
    assert all(recorder.seconds[label] > 0 for label in recorder.order)


def test_profiled_step_rows(breakdown, capsys):
    torch.manual_seed(0)
    toy = Toy()
    optimizer = torch.optim.AdamW(toy.parameters())
    stages = [("a", toy.a, None), ("b", toy.b, None)]
    result = breakdown.profile_step(toy, [torch.randn(ROWS, COLUMNS)], optimizer, stages)
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["other", "a", "b", "backward", "optimizer step"]
    output = 4 * ROWS * COLUMNS * FLOAT / breakdown.MIB  # each stage's output, in MiB
    assert rows["a"]["held_mib"] == pytest.approx(output / 4)
    assert rows["b"]["held_mib"] == pytest.approx(output)
    # a allocates its output, b one more of the same size while a's is still alive
    assert output <= rows["a"]["peak_mib"] < 1.1 * output
    assert 2 * output <= rows["b"]["peak_mib"] < 2.1 * output
    assert rows["backward"]["held_mib"] == rows["optimizer step"]["held_mib"] == 0
    # the backward pass's time, split by the stage of each node's forward op
    assert rows["a"]["backward_ms"] > 0 and rows["b"]["backward_ms"] > 0
    assert rows["a"]["backward_ms"] + rows["b"]["backward_ms"] <= rows["backward"]["ms"]
    assert rows["backward"]["backward_ms"] == rows["optimizer step"]["backward_ms"] == 0
    assert rows["optimizer step"]["peak_mib"] > 0  # AdamW's first step allocates its state
    assert [h["stage"] for h in result["held"]] == ["b", "a"]  # largest first

    breakdown.print_breakdown(result)
    text = capsys.readouterr().out
    b = rows["b"]
    assert (
        f"| b | {b['ms']:.0f} | {b['backward_ms']:.0f} | {output:.0f} | {b['peak_mib']:.0f} |"
        in text
    )
    assert f"| b | {ROWS}x{4 * COLUMNS} | float32 | 1 | {output:.0f} |" in text
