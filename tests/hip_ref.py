"""An independent re-implementation of HiP's selection, written from docs/hip.md with plain loops.

Per (batch, selection head, query block): sampled rows; candidate chunks on the grid from the sink
end; each stage keeps the best ``keep // chunk`` candidates by ``max_r q_r . mean(K_chunk)``, ties to
the earlier chunk; the survivors split into the next size; the final stage keeps the best
``k // block_k`` key blocks by ``max_{r, j} q_r . k_j``. Float64 throughout. Small inputs only.
"""

from __future__ import annotations

import math

import torch


def _rank(cands, score, m):
    """The ``m`` best candidates (ties to the lower id), ascending."""
    order = sorted(cands, key=lambda c: (-score(c), c))
    return sorted(order[:m])


def hip_select64(hip, q, k, q_offset):
    """Selected key-block ids: list [B][sel_head][qblock] of ascending lists."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    gs = G if hip.share_kv else 1
    bq, bk = hip.block_q, hip.block_k
    S = math.ceil(hip.sink / bk) * bk
    stages = [] if not hip.stages else [tuple(map(int, s.split(":"))) for s in hip.stages.split("/")]
    qd, kd = q.double(), k.double()
    out = []
    for b in range(B):
        heads = []
        for s in range(Hq // gs):
            qheads = list(range(s * gs, (s + 1) * gs))
            kvh = qheads[0] // G
            blocks = []
            for qb in range(math.ceil(Nq / bq)):
                P0 = q_offset + qb * bq
                W = (max(0, P0 - hip.window + 1) // bk) * bk
                rows = [qb * bq + t * hip.q_stride for t in range(math.ceil(bq / hip.q_stride))]
                rows = [r for r in rows if r < Nq]
                Qs = torch.stack([qd[b, h, r] for h in qheads for r in rows])  # sampled rows
                if W <= S:
                    blocks.append([])
                    continue

                def chunk_score(c, n):  # chunk n of size c on the grid from S, mean of its existing keys
                    lo, hi = S + n * c, min(S + (n + 1) * c, Nk)
                    mean = kd[b, kvh, lo:hi].mean(0)
                    return float((Qs @ mean).max())

                def n_cand(c):
                    return math.ceil((W - S) / c)

                survivors = None
                prev = None
                for c, keep in stages:
                    if survivors is None:
                        cands = list(range(n_cand(c)))
                    else:
                        r = prev // c
                        cands = [n * r + i for n in survivors for i in range(r) if n * r + i < n_cand(c)]
                    survivors = _rank(cands, lambda n, c=c: chunk_score(c, n), keep // c)
                    prev = c
                if survivors is None:
                    cands = list(range(n_cand(bk)))
                else:
                    r = prev // bk
                    cands = [n * r + i for n in survivors for i in range(r) if n * r + i < n_cand(bk)]

                def block_score(n):
                    lo = S + n * bk
                    return float((Qs @ kd[b, kvh, lo:lo + bk].T).max())

                best = _rank(cands, block_score, hip.k // bk)
                blocks.append([n + S // bk for n in best])
            heads.append(blocks)
        out.append(heads)
    return out
