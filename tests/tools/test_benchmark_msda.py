"""tools/benchmark_msda.py: the levels it samples for an input size, and its refusal of a bad
size."""

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("benchmark_msda")


def test_levels_of_an_input_size(tool):
    assert tool.levels_of(tool.SIZE) == tool.LEVELS == [(100, 167), (50, 84), (25, 42), (13, 21)]
    # each stride-2 step rounds up, as the backbone's convolutions do
    assert tool.levels_of((200, 333)) == [(25, 42), (13, 21), (7, 11), (4, 6)]


@pytest.mark.parametrize("size", ["800", "0x100", "axb", "800x1333x3"])
def test_a_bad_size_is_refused_naming_it(tool, capsys, size):
    with pytest.raises(SystemExit) as exit:
        tool.main(["--device", "cpu", "--size", size])
    assert exit.value.code == 2
    assert f"--size takes HxW in pixels, e.g. 800x1333, got {size!r}" in capsys.readouterr().err
