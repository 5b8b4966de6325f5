"""Receptive fields, strides and paddings against PAPER.md."""

import pytest

import vggkit
from vggkit.models.receptive_field import stack_receptive_field

PAPER = {  # rf / stride / padding at pool1..pool5, and fc6 as a 7x7 conv
    "A": [(4, 2, 1), (10, 4, 3), (30, 8, 11), (70, 16, 27), (150, 32, 59), 342],
    "D": [(6, 2, 2), (16, 4, 6), (44, 8, 18), (100, 16, 42), (212, 32, 90), 404],
    "E": [(6, 2, 2), (16, 4, 6), (52, 8, 22), (124, 16, 54), (268, 32, 118), 460],
}


@pytest.mark.parametrize("config", PAPER)
def test_pools_and_fc6_match_the_paper(config):
    table = vggkit.receptive_field(config)
    for block, expected in enumerate(PAPER[config][:5], start=1):
        rf = table[f"pool{block}"]
        assert (rf.receptive_field, rf.stride, rf.padding) == expected
    assert table["fc6"].receptive_field == PAPER[config][5]


def test_d_conv5_3_sees_196_pixels_and_every_layer_is_listed():
    table = vggkit.receptive_field("vgg16")
    assert table["conv5_3"].receptive_field == 196
    assert list(table)[:3] == ["conv1_1", "conv1_2", "pool1"] and list(table)[-3:] == ["fc6", "fc7", "fc8"]


def test_1x1_convs_of_c_do_not_grow_the_field():
    table = vggkit.receptive_field("C")
    assert table["conv3_3"].receptive_field == table["conv3_2"].receptive_field


def test_three_3x3_see_as_far_as_one_7x7():
    assert stack_receptive_field(3, 3) == stack_receptive_field(7, 1) == 7
    assert [stack_receptive_field(3, n) for n in (1, 2, 3, 4)] == [3, 5, 7, 9]
