"""Independent transcriptions of the compiled kernels' summation orders, for bitwise tests of the CPU
kernels and of the CUDA kernels against them (the CUDA kernels reproduce the CPU order).

perturb's in_norm: the flat output [N * B * D] is cut into spans at row ends and at every multiple of
1024 elements; in a span, element i of the whole blocks of 8 adds to lane i % 8, the rest to lane 0, the
lanes are summed in order, a row adds its spans in order, then the square root.
lipschitz: element k of a row adds to lane k % 8, then the pairwise tree (l += l + 4, l += l + 2,
0 += 1); the gradient of out sums its terms over n in order.
All in the opmath dtype (float64 for float64, float32 otherwise), one rounding per operation.
"""

import math

import torch

SPAN = 1024
LANES = 8


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def correctly_rounded_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt rounded once, as sqrt/sqrtf in C++ and CUDA.  torch's vectorised CPU sqrt may be 1 ulp off
    (float32 and float64 alike): float64 uses Python's math.sqrt (IEEE), float32 rounds the float64 root
    of a float32, which lies far enough from a float32 rounding boundary."""
    if v.dtype == torch.float32:
        return (
            torch.tensor([math.sqrt(e) for e in v.double().flatten().tolist()], dtype=torch.float64)
            .to(torch.float32)
            .reshape(v.shape)
        )
    return torch.tensor([math.sqrt(e) for e in v.flatten().tolist()], dtype=v.dtype).reshape(v.shape)


def _lane_sums(sq: torch.Tensor, blocks: int, zero_tail_lanes: bool) -> torch.Tensor:
    """sq [S, L] (rows of equal length L = 8 * blocks + tail, padding +0): the 8 lane sums of each row,
    the tail added to lane 0 (zero_tail_lanes) in order."""
    lanes = torch.zeros(sq.shape[0], LANES, dtype=sq.dtype)
    for j in range(blocks):
        lanes = lanes + sq[:, j * LANES : (j + 1) * LANES]
    tail = sq[:, blocks * LANES :]
    if zero_tail_lanes:
        for t in range(tail.shape[1]):
            lanes[:, 0] = lanes[:, 0] + tail[:, t]
    return lanes


def perturb_in_norm(x: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
    """in_norm [N, B] of perturb(x) -> x_tilde [N, *x.shape], in the kernels' order."""
    op = opmath(x.dtype)
    n, b = x_tilde.shape[0], x.shape[0]
    d = x.numel() // b if b else 0
    rows = n * b
    if rows == 0 or d == 0:
        return torch.zeros(n, b, dtype=op)
    diff = x_tilde.reshape(rows, d).to(op) - x.reshape(1, b, d).expand(n, b, d).reshape(rows, d).to(op)
    sq = (diff * diff).reshape(-1)
    # every span: (row, start, length); a span ends at its row's end or at the next multiple of SPAN
    spans = []
    for r in range(rows):
        start, end = r * d, (r + 1) * d
        while start < end:
            stop = min(end, (start // SPAN + 1) * SPAN)
            spans.append((r, start, stop - start))
            start = stop
    longest = max(length for _, _, length in spans)
    vec = torch.zeros(len(spans), longest // LANES * LANES, dtype=op)
    tails = torch.zeros(len(spans), LANES - 1, dtype=op)
    for s, (_, start, length) in enumerate(spans):
        whole = length // LANES * LANES
        vec[s, :whole] = sq[start : start + whole]
        tails[s, : length - whole] = sq[start + whole : start + length]
    lanes = _lane_sums(torch.cat([vec, tails], dim=1), longest // LANES, zero_tail_lanes=True)
    totals = torch.zeros(len(spans), dtype=op)
    for lane in range(LANES):
        totals = totals + lanes[:, lane]
    per_row = [[] for _ in range(rows)]
    for s, (r, _, _) in enumerate(spans):
        per_row[r].append(totals[s])
    width = max(len(p) for p in per_row)
    matrix = torch.zeros(rows, width, dtype=op)
    for r, parts in enumerate(per_row):
        matrix[r, : len(parts)] = torch.stack(parts)
    sums = torch.zeros(rows, dtype=op)
    for j in range(width):
        sums = sums + matrix[:, j]
    return correctly_rounded_sqrt(sums).reshape(n, b)


def row_sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [R, K] in the opmath dtype -> [R]: 8 lanes (element k to lane k % 8), then the tree."""
    r, k = a.shape
    blocks = (k + LANES - 1) // LANES
    sq = torch.zeros(r, blocks * LANES, dtype=a.dtype)
    diff = a - b
    sq[:, :k] = diff * diff
    lanes = _lane_sums(sq, blocks, zero_tail_lanes=False)
    for width in (4, 2, 1):
        lanes = lanes[:, :width] + lanes[:, width : 2 * width]
    return lanes[:, 0]


def lipschitz(out: torch.Tensor, pert: torch.Tensor, in_norm: torch.Tensor, grad: torch.Tensor | None = None):
    """ratio [N, B] (opmath), and with grad: grad_out [B, K] and grad_pert [N, B, K] (out's dtype)."""
    op = opmath(out.dtype)
    n, b, k = pert.shape
    o = out.to(op)
    p = pert.to(op)
    den = in_norm.to(op)
    sq = row_sq_distance(o.unsqueeze(0).expand(n, b, k).reshape(n * b, k), p.reshape(n * b, k)).reshape(n, b)
    num = correctly_rounded_sqrt(sq)
    zero = torch.zeros((), dtype=op)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1), zero)
    if grad is None:
        return ratio
    ok = (num > 0) & (den > 0)
    coef = torch.where(ok, grad.to(op) / torch.where(ok, num * den, 1), zero)
    terms = (o.unsqueeze(0) - p) * coef.unsqueeze(2)
    acc = torch.zeros(b, k, dtype=op)
    for i in range(n):
        acc = acc + terms[i]
    return ratio, acc.to(out.dtype), (-terms).to(pert.dtype)
