"""`ModelInputs.select_rows` on inputs packed over a batch's patches or crops."""

import torch

from vlminterp.models.base import ModelInputs


def test_select_rows_splits_a_packed_tensor_along_its_row_axis():
    # row 0 owns columns 0..2, row 1 columns 3..4 of a [1, C, L] tensor; sizes along axis 0
    # for the crops' table
    packed = torch.arange(10).view(1, 2, 5)
    sizes = torch.tensor([[1, 1], [2, 2], [3, 3]])
    inputs = ModelInputs({"input_ids": torch.tensor([[7, 8], [9, 10]]), "pixels": packed,
                          "sizes": sizes},
                         meta={"row_sizes": {"pixels": [3, 2], "sizes": [2, 1]},
                               "row_axis": {"pixels": -1}})
    picked = inputs.select_rows([1, 0, 1])
    want = torch.cat([packed[..., 3:], packed[..., :3], packed[..., 3:]], dim=-1)
    assert torch.equal(picked["pixels"], want)
    assert picked["sizes"].tolist() == [[3, 3], [1, 1], [2, 2], [3, 3]]
    assert picked["input_ids"].tolist() == [[9, 10], [7, 8], [9, 10]]
    assert picked.meta["row_sizes"] == {"pixels": [2, 3, 2], "sizes": [1, 2, 1]}
    again = picked.select_rows([1])  # the axis travels with the rows
    assert torch.equal(again["pixels"], packed[..., :3])
