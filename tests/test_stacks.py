"""Section 2.3: stacked 3x3 convs against one large conv, analytic and measured on modules."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vggkit.models.stacks import (compared_designs, conv_stack, measure_designs, measured_receptive_field,
    stack_cost_rows)
from vggkit.models.vgg import count_parameters


def test_paper_numbers_for_three_layers():
    stack, single = compared_designs(channels=10, depth=3)
    assert (stack.kernel, stack.depth, single.kernel, single.depth) == (3, 3, 7, 1)
    assert stack.receptive_field == single.receptive_field == 7
    assert stack.weights == 27 * 10**2 and single.weights == 49 * 10**2
    assert (stack.nonlinearities, single.nonlinearities) == (3, 1)
    assert stack.weights_formula == "3·9C² = 27C²" and single.weights_formula == "49C²"


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_counted_parameters_and_measured_receptive_field(depth):
    for design in compared_designs(channels=4, depth=depth):
        module = design.module()
        assert count_parameters(module) == design.parameters
        assert measured_receptive_field(module, channels=4) == design.receptive_field == 2 * depth + 1


@pytest.mark.parametrize("depth", [2, 3])
def test_multiply_adds_match_pytorchs_flop_counter(depth):
    for design in compared_designs(channels=6, depth=depth):
        with FlopCounterMode(display=False) as counter:
            design.module()(torch.zeros(1, 6, 20, 20))
        assert counter.get_total_flops() == 2 * design.multiply_adds(20)


def test_conv_stack_keeps_the_shape():
    assert conv_stack(5, 3, 3)(torch.zeros(2, 5, 9, 11)).shape == (2, 5, 9, 11)


def test_rows_for_the_app():
    rows = stack_cost_rows(channels=64, depth=3, size=56)
    assert [r["design"] for r in rows] == ["3 x conv3x3", "1 x conv7x7"]
    assert rows[0]["weights"] == "3·9C² = 27C² = 110,592"
    assert rows[1]["multiply-adds at 56x56"] == f"{49 * 64 * 64 * 56 * 56:,}"
    measured = measure_designs(channels=8, depth=2, size=16, repeats=1)
    assert [r["receptive field (measured, px)"] for r in measured] == [5, 5]
    assert measured[0]["parameters (counted)"] == f"{2 * (9 * 64 + 8):,}"
    assert all(r["forward at 16x16 (ms)"] > 0 for r in measured)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="channels and depth must be >= 1"):
        compared_designs(channels=0, depth=3)
