"""Hand-written examples of the two itae ops, with the expected values written out by hand.

Shared by tests/test_itae.py (the PyTorch twins) and tests/test_onnx_ops.py (the ONNX functions in
ONNX Runtime): ties, norms equal to theta and empty groups must come out the same in both.
"""

import torch

INF = float("inf")

# CLS first (index 0, excluded from C), then 4 candidates. theta = 3.
HAND_NORMS = [
    [0.5, 1.0, 5.0, 2.0, 6.0],  # La={1,3} Lb={2,4}: tie -> La. (Counting the CLS, 0.5 in La, would give Lb.)
    [9.0, 1.0, 5.0, 7.0, 8.0],  # La={1} Lb={2,3,4}: La
    [0.1, 1.0, 2.0, 7.0, 0.5],  # La={1,2,4} Lb={3}: Lb
    [9.0, 1.0, 1.0, 1.0, 1.0],  # Lb empty -> no artifacts under minority
    [0.1, 4.0, 4.0, 5.0, 6.0],  # La empty -> no artifacts under minority
    [9.0, 3.0, 3.0, 3.5, 3.0],  # norm == theta is in La: La={1,2,4} Lb={3}: Lb
]
HAND_EXPECTED = {
    "minority": [
        [True, False, True, False],
        [True, False, False, False],
        [False, False, True, False],
        [False, False, False, False],
        [False, False, False, False],
        [False, False, True, False],
    ],
    "below": [
        [True, False, True, False],
        [True, False, False, False],
        [True, True, False, True],
        [True, True, True, True],
        [False, False, False, False],
        [True, True, False, True],
    ],
    "above": [
        [False, True, False, True],
        [False, True, True, True],
        [False, False, True, False],
        [False, False, False, False],
        [True, True, True, True],
        [False, False, True, False],
    ],
}


# B=2, H=2, T=5. Image 0: artifact columns 2 and 4; image 1: column 1 only.
HAND_MASK = torch.tensor([[False, True, False, True], [True, False, False, False]])


def hand_logits():
    s = torch.zeros(2, 2, 5, 5)
    # image 0, head 0, CLS row: CLS column -5 (smallest overall, must be ignored by min/mean);
    # artifact column 4 holds the smallest candidate -3 (must be included by min)
    s[0, 0, 0] = torch.tensor([-5.0, 1.0, 4.0, 3.0, -3.0])
    s[0, 0, 2] = torch.tensor([2.0, 6.0, 0.0, -1.0, 8.0])
    s[0, 1, 0] = torch.tensor([0.0, 2.0, 2.0, 2.0, 6.0])
    s[1, 0, 0] = torch.tensor([7.0, -2.0, 1.0, 0.0, 5.0])
    s[1, 1, 3] = torch.tensor([1.0, 1.0, 4.0, 9.0, -6.0])
    return s


HAND_CLS_ROWS = {  # (b, h) -> expected CLS row for rows=cls, lsa=False
    "min": {(0, 0): [-5, 1, -3, 3, -3], (0, 1): [0, 2, 2, 2, 2], (1, 0): [7, -2, 1, 0, 5]},
    "mean": {(0, 0): [-5, 1, 1.25, 3, 1.25], (0, 1): [0, 2, 3, 2, 3], (1, 0): [7, 1, 1, 0, 5]},
    "neg-inf": {(0, 0): [-5, 1, -INF, 3, -INF], (0, 1): [0, 2, -INF, 2, -INF], (1, 0): [7, -INF, 1, 0, 5]},
}


