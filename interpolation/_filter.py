"""Linear time-invariant filters run over the repeated Δ sequence, without a per-row loop.

State ``s_t = A s_{t-1} + b z_t``, output ``y_t = c . s_t``, one filter per channel, where
``z`` is Δ repeated γ times (piecewise constant). Within a block the state has a closed
form, so only block-end states need a scan, done by log2(n_blocks) doubling steps.
"""

from __future__ import annotations

import torch


def run_filter(delta: torch.Tensor, gamma: int, n_body: int, A, b, c, s0) -> torch.Tensor:
    """Filter output for every body row.

    delta (..., nb, C) -> (..., n_body, C). ``s0 * z_0`` is the state before row 0, so the
    first output equals ``Δ_0`` for the filters here.
    """
    dt = delta.dtype if delta.dtype == torch.float64 else torch.float32
    dev = delta.device
    A = torch.as_tensor(A, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64)
    s0 = torch.as_tensor(s0, dtype=torch.float64)
    m = A.shape[0]
    # P_j = A^(j+1), Q_j = sum_{i<=j} A^i b, for j = 0..γ-1 (float64 on the host: tiny)
    P, Q = [], []
    Ap, acc = torch.eye(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for _ in range(gamma):
        acc = acc + Ap @ b
        Ap = A @ Ap
        P.append(Ap.clone())
        Q.append(acc.clone())
    P, Q = torch.stack(P), torch.stack(Q)  # [γ, m, m], [γ, m]
    M, qend = P[-1], Q[-1]
    z = delta.to(dt)  # [..., nb, C]
    nb = z.shape[-2]
    # block-end states S_k = M S_{k-1} + qend z_k, S_{-1} = s0 z_0
    u = z.unsqueeze(-1) * qend.to(dt, ).to(dev)  # [..., nb, C, m]
    init = z[..., :1, :].unsqueeze(-1) * s0.to(dt).to(dev)  # [..., 1, C, m]
    u[..., :1, :, :] += init @ M.T.to(dt).to(dev)
    d, Md = 1, M.clone()
    while d < nb:
        shifted = u[..., :-d, :, :] @ Md.T.to(dt).to(dev)
        u = torch.cat([u[..., :d, :, :], u[..., d:, :, :] + shifted], dim=-3)
        Md = Md @ Md
        d *= 2
    S_prev = torch.cat([init, u[..., :-1, :, :]], dim=-3)  # state before each block
    r = (P.transpose(-1, -2) @ c).to(dt).to(dev)  # [γ, m]: c . P_j s = s . (P_j^T c)
    qv = (Q @ c).to(dt).to(dev)  # [γ]
    y = torch.einsum("...kcm,jm->...kjc", S_prev, r) + z.unsqueeze(-2) * qv[:, None]
    return y.flatten(-3, -2)[..., :n_body, :].to(delta.dtype)
