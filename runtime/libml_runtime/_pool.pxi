# Pooling kernels (format 2.3, opcodes 51-54: max_pool, max_pool_grad, avg_pool, avg_pool_grad), included by
# _exec.pyx.  NCHW planes; the geometry is described at the opcodes in format.py.  One task per (n, c)
# plane, its outputs in order, so every sum (the gradients' scatter-adds) has a fixed order.
from libc.math cimport INFINITY, NAN

cdef struct _pgeo:
    int64_t N, C, H, W, kh, kw, sh, sw, ph, pw, eh, ew, dh, dw, OH, OW, HW, P


cdef inline void _pool_geo(const int64_t *f, _pgeo *g) noexcept nogil:
    g.N, g.C, g.H, g.W = f[LM_F_MAX_POOL_N], f[LM_F_MAX_POOL_C], f[LM_F_MAX_POOL_H], f[LM_F_MAX_POOL_W]
    g.kh, g.kw, g.sh, g.sw = f[LM_F_MAX_POOL_kh], f[LM_F_MAX_POOL_kw], f[LM_F_MAX_POOL_sh], f[LM_F_MAX_POOL_sw]
    g.ph, g.pw, g.eh, g.ew = f[LM_F_MAX_POOL_ph], f[LM_F_MAX_POOL_pw], f[LM_F_MAX_POOL_eh], f[LM_F_MAX_POOL_ew]
    g.dh, g.dw, g.OH, g.OW = f[LM_F_MAX_POOL_dh], f[LM_F_MAX_POOL_dw], f[LM_F_MAX_POOL_OH], f[LM_F_MAX_POOL_OW]
    g.HW, g.P = g.H * g.W, g.OH * g.OW


cdef inline int64_t _taps(int64_t start, int64_t d, int64_t k, int64_t lim, int64_t *lo) noexcept nogil:
    """The taps t in [lo, hi) of a window starting at `start` (step d, k taps) with 0 <= start + t*d < lim:
    returns hi, sets lo."""
    cdef int64_t l = 0, h = k
    if start < 0:
        l = (-start + d - 1) // d
    if start + (k - 1) * d >= lim:
        h = (lim - 1 - start) // d + 1 if lim - 1 >= start else 0
    if l > h:
        l = h
    lo[0] = l
    return h


cdef inline int64_t _plane_index(const _pgeo *g, int64_t order, int64_t ih, int64_t iw) noexcept nogil:
    return iw * g.H + ih if order else ih * g.W + iw


cdef int _max_pool(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef _pgeo g
    _pool_geo(f, &g)
    cdef int64_t order = f[LM_F_MAX_POOL_order], t
    cdef const floating *x = <const floating*>_ptr(bases, f + LM_F_MAX_POOL_x_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_MAX_POOL_y_slot)
    cdef int64_t *idx = <int64_t*>_ptr(bases, f + LM_F_MAX_POOL_idx_slot)
    cdef int nt = _threads(g.N * g.C * g.P * g.kh * g.kw, nthreads)
    for t in prange(g.N * g.C, num_threads=nt, schedule="static"):
        _max_pool_plane(dummy, &g, order, t, x + t * g.HW, y + t * g.P, idx + t * g.P)
    return 0


cdef void _max_pool_plane(floating dummy, const _pgeo *g, int64_t order, int64_t plane, const floating *x,
                          floating *y, int64_t *idx) noexcept nogil:
    cdef int64_t oh, ow, i, j, ilo, ihi, jlo, jhi, hs, ws, ih, iw, best_i
    cdef floating best, v
    for oh in range(g.OH):
        hs = oh * g.sh - g.ph
        ihi = _taps(hs, g.dh, g.kh, g.H, &ilo)
        for ow in range(g.OW):
            ws = ow * g.sw - g.pw
            jhi = _taps(ws, g.dw, g.kw, g.W, &jlo)
            best = -INFINITY
            best_i = -1
            for i in range(ilo, ihi):
                ih = hs + i * g.dh
                for j in range(jlo, jhi):
                    iw = ws + j * g.dw
                    v = x[ih * g.W + iw]
                    # PyTorch's rule: a NaN wins (the last one), else the first of equal maxima
                    if v > best or v != v or best_i < 0:
                        best = v
                        best_i = _plane_index(g, order, ih, iw)
            y[oh * g.OW + ow] = best
            idx[oh * g.OW + ow] = plane * g.HW + best_i if best_i >= 0 else -1


cdef int _max_pool_grad(floating dummy, const int64_t *f, char **bases, int64_t *detail, int nthreads) noexcept nogil:
    cdef _pgeo g
    _pool_geo(f, &g)
    cdef int64_t order = f[LM_F_MAX_POOL_GRAD_order], t, bad = -1, k, r
    cdef const floating *dy = <const floating*>_ptr(bases, f + LM_F_MAX_POOL_GRAD_dy_slot)
    cdef const int64_t *idx = <const int64_t*>_ptr(bases, f + LM_F_MAX_POOL_GRAD_idx_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_MAX_POOL_GRAD_dx_slot)
    cdef int nt = _threads(g.N * g.C * g.P, nthreads)
    # every index must lie in its output's own plane (a computed index tensor from a hand-made plan is
    # refused before anything is written)
    for k in range(g.N * g.C * g.P):
        r = idx[k]
        if r != -1 and (r < (k // g.P) * g.HW or r >= (k // g.P + 1) * g.HW):
            detail[0] = k
            return ERR_INDEX
    for t in prange(g.N * g.C, num_threads=nt, schedule="static"):
        _max_pool_grad_plane(dummy, &g, order, t, dy + t * g.P, idx + t * g.P, dx + t * g.HW)
    return 0


cdef void _max_pool_grad_plane(floating dummy, const _pgeo *g, int64_t order, int64_t plane, const floating *dy,
                               const int64_t *idx, floating *dx) noexcept nogil:
    cdef int64_t k, r
    memset(dx, 0, <size_t>g.HW * sizeof(floating))
    for k in range(g.P):
        if idx[k] < 0:
            continue
        r = idx[k] - plane * g.HW
        if order:  # column-major within the plane: r = iw * H + ih
            r = (r % g.H) * g.W + r // g.H
        dx[r] += dy[k]


cdef inline int64_t _avg_count(const _pgeo *g, int64_t include_pad, int64_t hs, int64_t ws, int64_t ilo,
                               int64_t ihi, int64_t jlo, int64_t jhi) noexcept nogil:
    cdef int64_t a, b, c, d
    if not include_pad:
        return (ihi - ilo) * (jhi - jlo)
    # taps inside the padded input [-ph, H + eh) x [-pw, W + ew)
    b = _taps(hs + g.ph, g.dh, g.kh, g.H + g.ph + g.eh, &a)
    d = _taps(ws + g.pw, g.dw, g.kw, g.W + g.pw + g.ew, &c)
    return (b - a) * (d - c)


cdef int _avg_pool(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef _pgeo g
    _pool_geo(f, &g)
    cdef int64_t inc = f[LM_F_AVG_POOL_include_pad], t
    cdef const floating *x = <const floating*>_ptr(bases, f + LM_F_AVG_POOL_x_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_AVG_POOL_y_slot)
    cdef int nt = _threads(g.N * g.C * g.P * g.kh * g.kw, nthreads)
    for t in prange(g.N * g.C, num_threads=nt, schedule="static"):
        _avg_pool_plane(dummy, &g, inc, x + t * g.HW, y + t * g.P)
    return 0


cdef void _avg_pool_plane(floating dummy, const _pgeo *g, int64_t inc, const floating *x, floating *y) noexcept nogil:
    cdef int64_t oh, ow, i, j, ilo, ihi, jlo, jhi, hs, ws, cnt
    cdef floating s
    for oh in range(g.OH):
        hs = oh * g.sh - g.ph
        ihi = _taps(hs, g.dh, g.kh, g.H, &ilo)
        for ow in range(g.OW):
            ws = ow * g.sw - g.pw
            jhi = _taps(ws, g.dw, g.kw, g.W, &jlo)
            s = 0
            for i in range(ilo, ihi):
                for j in range(jlo, jhi):
                    s = s + x[(hs + i * g.dh) * g.W + ws + j * g.dw]
            cnt = _avg_count(g, inc, hs, ws, ilo, ihi, jlo, jhi)
            y[oh * g.OW + ow] = s / cnt if cnt > 0 else NAN


cdef int _avg_pool_grad(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef _pgeo g
    _pool_geo(f, &g)
    cdef int64_t inc = f[LM_F_AVG_POOL_GRAD_include_pad], t
    cdef const floating *dy = <const floating*>_ptr(bases, f + LM_F_AVG_POOL_GRAD_dy_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_AVG_POOL_GRAD_dx_slot)
    cdef int nt = _threads(g.N * g.C * g.P * g.kh * g.kw, nthreads)
    for t in prange(g.N * g.C, num_threads=nt, schedule="static"):
        _avg_pool_grad_plane(dummy, &g, inc, dy + t * g.P, dx + t * g.HW)
    return 0


cdef void _avg_pool_grad_plane(floating dummy, const _pgeo *g, int64_t inc, const floating *dy,
                               floating *dx) noexcept nogil:
    cdef int64_t oh, ow, i, j, ilo, ihi, jlo, jhi, hs, ws, cnt
    cdef floating v
    memset(dx, 0, <size_t>g.HW * sizeof(floating))
    for oh in range(g.OH):
        hs = oh * g.sh - g.ph
        ihi = _taps(hs, g.dh, g.kh, g.H, &ilo)
        for ow in range(g.OW):
            ws = ow * g.sw - g.pw
            jhi = _taps(ws, g.dw, g.kw, g.W, &jlo)
            cnt = _avg_count(g, inc, hs, ws, ilo, ihi, jlo, jhi)
            if cnt <= 0:
                continue
            v = dy[oh * g.OW + ow] / cnt
            for i in range(ilo, ihi):
                for j in range(jlo, jhi):
                    dx[(hs + i * g.dh) * g.W + ws + j * g.dw] += v
