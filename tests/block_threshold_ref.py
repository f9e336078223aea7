"""Independent float64 references of the ``block_threshold`` and ``oracle`` selections, written from
their docstrings with explicit loops (no code shared with the backends)."""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # shares within EPS of a decision boundary may go either way (float32 vs float64)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def _geom(bt, q, k, off):
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hkv if bt.share_kv else Hq
    bq, bk = bt.block_q, bt.block_k
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    last = [off + min((b + 1) * bq, nq) - 1 for b in range(nqb)]
    first = [off + b * bq for b in range(nqb)]
    vis = [[j for j in range(nkb) if j * bk <= last[b]] for b in range(nqb)]
    return B, Hq, Hkv, G, nq, nk, bq, bk, nqb, nkb, first, last, vis


def shares64(bt, q, k, off, scale):
    """P[b][g][qb] = {key block: share} from the scorer's definition."""
    q, k = q.double(), k.double()
    B, Hq, Hkv, G, nq, nk, bq, bk, nqb, nkb, first, last, vis = _geom(bt, q, k, off)
    hpg = Hq // G
    name = bt._scorer.name

    def kv_of(h):
        return h * Hkv // Hq

    def pooled():
        P = [[[None] * nqb for _ in range(G)] for _ in range(B)]
        for b in range(B):
            for g in range(G):
                for i in range(nqb):
                    acc = {j: 0.0 for j in vis[i]}
                    for h in range(g * hpg, (g + 1) * hpg):
                        qbar = q[b, h, i * bq:min((i + 1) * bq, nq)].mean(0)
                        s = [float(scale * (qbar @ k[b, kv_of(h), j * bk:min((j + 1) * bk, nk)].mean(0))) for j in vis[i]]
                        for j, p in zip(vis[i], _softmax(s)):
                            acc[j] += p / hpg
                    P[b][g][i] = acc
        return P

    if name == "pooled":
        return pooled()
    if name == "vslash":
        P = pooled()
        out = [[[None] * nqb for _ in range(G)] for _ in range(B)]
        for b in range(B):
            for g in range(G):
                vs, vc, ss, sc = {}, {}, {}, {}
                for i in range(nqb):
                    for j in vis[i]:
                        d = last[i] // bk - j
                        vs[j] = vs.get(j, 0.0) + P[b][g][i][j]
                        vc[j] = vc.get(j, 0) + 1
                        ss[d] = ss.get(d, 0.0) + P[b][g][i][j]
                        sc[d] = sc.get(d, 0) + 1
                for i in range(nqb):
                    c = {j: max(P[b][g][i][j], vs[j] / vc[j], ss[last[i] // bk - j] / sc[last[i] // bk - j])
                         for j in vis[i]}
                    t = sum(c.values())
                    out[b][g][i] = {j: x / t for j, x in c.items()}
        return out
    assert name == "antidiagonal"
    S = bt._scorer.stride
    M, Nks = -(-nq // S), -(-nk // S)
    P = [[[None] * nqb for _ in range(G)] for _ in range(B)]
    for b in range(B):
        for g in range(G):
            for i in range(nqb):
                acc = {j: 0.0 for j in vis[i]}
                ms = [m for m in range(i * bq // S, (i + 1) * bq // S) if m < M]
                for h in range(g * hpg, (g + 1) * hpg):
                    for m in ms:
                        lrow = off + min(m * S + S - 1, nq - 1)
                        ns = [n for n in range(Nks) if n * S <= lrow]
                        s = []
                        for n in ns:
                            t = 0.0
                            for a in range(S):
                                r, key = m * S + a, n * S + S - 1 - a
                                if r < nq and key < nk:
                                    t += float(q[b, h, r] @ k[b, kv_of(h), key])
                            s.append(scale * t / S)
                        for n, p in zip(ns, _softmax(s)):
                            j = n * S // bk
                            if j in acc:
                                acc[j] += p / (len(ms) * hpg)
                P[b][g][i] = acc
    return P


def _ranked(P):
    """Visible blocks best first, ties to the lower id."""
    return sorted(P, key=lambda j: (-P[j], j))


def select64(bt, q, k, off, scale):
    """(must, may): sets of (b, g, qb, kb) the selection must keep / may keep (boundary slack EPS)."""
    B, Hq, Hkv, G, nq, nk, bq, bk, nqb, nkb, first, last, vis = _geom(bt, q, k, off)
    if nq < bt.min_len:
        raise ValueError("dense fallback: no selection")
    Ps = shares64(bt, q, k, off, scale)
    rule = bt._rule
    n_sink = -(-bt.sink // bk)
    must, may = set(), set()
    for b in range(B):
        for g in range(G):
            for i in range(nqb):
                P = Ps[b][g][i]
                w0 = max(0, first[i] - bt.window + 1) // bk
                forced = {j for j in vis[i] if j < n_sink or j >= w0 or i >= nqb - bt.dense_last}
                if rule.name == "relative":
                    top = max(P.values())
                    hard = {j for j in vis[i] if P[j] > 0 and P[j] >= rule.alpha * top + EPS}
                    soft = {j for j in vis[i] if P[j] > 0 and P[j] >= rule.alpha * top - EPS}
                elif rule.name == "mass":
                    total, before = sum(P.values()), 0.0
                    hard, soft = set(), set()
                    for j in _ranked(P):
                        if P[j] > 0 and before < rule.tau * total - EPS:
                            hard.add(j)
                        if P[j] > 0 and before < rule.tau * total + EPS:
                            soft.add(j)
                        before += P[j]
                else:
                    assert rule.name == "topk"
                    ranked = _ranked(P)
                    hard = set(ranked[: rule.k])
                    kth = P[ranked[rule.k - 1]] if len(ranked) >= rule.k else -1
                    soft = hard | {j for j in ranked if abs(P[j] - kth) < EPS}
                hard, soft = hard - forced, soft - forced
                if bt.budget is not None:
                    n = bt.budget // bk
                    rk = sorted(soft, key=lambda j: (-P[j], j))
                    if len(soft) > n:
                        cut = P[rk[n - 1]] if n else float("inf")
                        hard = {j for j in hard if P[j] > cut + EPS} if n else set()
                        soft = {j for j in soft if P[j] >= cut - EPS} if n else set()
                for j in forced | hard:
                    must.add((b, g, i, j))
                for j in forced | soft:
                    may.add((b, g, i, j))
    return must, may


def oracle_select64(orc, q, k, off, scale):
    """(must, may) for the oracle: exact float64 masses, diagonal first, then by mass."""
    q, k = q.double(), k.double()
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hkv if orc.share_kv else Hq
    hpg = Hq // G
    bq, bk = orc.block_q, orc.block_k
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    must, may = set(), set()
    for b in range(B):
        for g in range(G):
            for i in range(nqb):
                r0, r1 = i * bq, min((i + 1) * bq, nq)
                first, last = off + r0, off + r1 - 1
                vis = [j for j in range(nkb) if j * bk <= last]
                mass = {j: 0.0 for j in vis}
                for h in range(g * hpg, (g + 1) * hpg):
                    kv = h * Hkv // Hq
                    for r in range(r0, r1):
                        p = off + r
                        s = (k[b, kv, : p + 1] @ q[b, h, r]) * scale
                        w = torch.softmax(s, 0)
                        for j in vis:
                            mass[j] += float(w[j * bk:min((j + 1) * bk, p + 1)].sum())
                diag = [j for j in vis if first // bk <= j <= last // bk]
                budget = orc.k // bk if orc.k is not None else math.ceil(orc.density * len(vis))
                budget += len(diag)
                total = sum(mass.values())
                rest = sorted((j for j in vis if j not in diag), key=lambda j: (-mass[j], j))
                n = budget - len(diag)
                hard = set(diag) | set(rest[:n])
                soft = set(hard)
                if 0 < n < len(rest):
                    cut = mass[rest[n - 1]]
                    soft |= {j for j in rest if abs(mass[j] - cut) < EPS * total}
                    hard -= {j for j in rest if abs(mass[j] - cut) < EPS * total}
                    hard |= set(diag)
                for j in hard:
                    must.add((b, g, i, j))
                for j in soft:
                    may.add((b, g, i, j))
    return must, may


def kept(pattern):
    """The set of (b, g, qb, kb) a pattern's lists hold (groups (B, G))."""
    ip, ix = pattern.block_indptr.cpu(), pattern.block_indices.cpu()
    G, nqb = pattern.group_heads, pattern.n_qblocks
    out = set()
    for s in range(pattern.groups * nqb):
        bg, i = divmod(s, nqb)
        b, g = divmod(bg, G)
        for j in ix[ip[s]:ip[s + 1]].tolist():
            out.add((b, g, i, j))
    return out


def oracle_global64(orc, q, k, off, scale):
    """(must, may) for ``allocate="global"``: weighted float64 masses, greedy by mass per pair."""
    q, k = q.double(), k.double()
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hkv if orc.share_kv else Hq
    hpg = Hq // G
    bq, bk = orc.block_q, orc.block_k
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    must, may = set(), set()
    for b in range(B):
        for g in range(G):
            cells, diag_pairs, dense = [], 0, 0
            for i in range(nqb):
                r0, r1 = i * bq, min((i + 1) * bq, nq)
                first, last = off + r0, off + r1 - 1
                for j in range(nkb):
                    if j * bk > last:
                        continue
                    pairs = sum(max(0, min(off + r, (j + 1) * bk - 1, nk - 1) - j * bk + 1) for r in range(r0, r1))
                    dense += pairs
                    if first // bk <= j <= last // bk:
                        must.add((b, g, i, j))
                        may.add((b, g, i, j))
                        diag_pairs += pairs
                        continue
                    m = 0.0
                    for h in range(g * hpg, (g + 1) * hpg):
                        kv = h * Hkv // Hq
                        for r in range(r0, r1):
                            p = off + r
                            w = torch.softmax((k[b, kv, : p + 1] @ q[b, h, r]) * scale, 0)
                            m += (p + 1) * float(w[j * bk:min((j + 1) * bk, p + 1)].sum())
                    cells.append((-(m / pairs), i, j, pairs))
            left = orc.density * dense - diag_pairs
            cells.sort()
            ratios = [-c[0] for c in cells]
            used = 0.0
            for idx, (negr, i, j, pairs) in enumerate(cells):
                near = any(abs(ratios[idx] - r) < EPS * max(1.0, abs(r)) for r in ratios[:idx] + ratios[idx + 1:])
                if used + pairs <= left:
                    used += pairs
                    if not near:
                        must.add((b, g, i, j))
                    may.add((b, g, i, j))
                elif near:
                    may.add((b, g, i, j))
                    if any(abs(ratios[idx] - r) < EPS * max(1.0, abs(r)) for r in ratios[:idx]):
                        break  # order among near-equal cells decides: stop asserting the rest
    return must, may
