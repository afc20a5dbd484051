# Resize kernels (format 2.3, opcodes 56-57: resize, resize_grad), included by _exec.pyx.  Separable
# resampling of P planes of H x W into OH x OW through the compiler's per-axis tables (source indices
# and weights, in the constant pool; layout at the opcodes in format.py).  Forward: one task per output
# row; backward: one task per plane, owning its dx plane, so every scatter-add has a fixed order.

cdef struct _rgeo:
    int64_t P, H, W, OH, OW, kh, kw, ext
    const double *ih
    const double *wh
    const double *iw
    const double *ww
    double extv


cdef inline bint _bad_tap(double v, int64_t lim, bint may_extrapolate) noexcept nogil:
    """Whether table index v is not an integer in [0, lim) (nor the -1 of an extrapolated output)."""
    if may_extrapolate and v == -1:
        return False
    # (NaN fails both comparisons; the cast is reached only for a value in range)
    return not (v >= 0 and v <= lim - 1 and v == <double>(<int64_t>v))


cdef int _resize_geo(const int64_t *f, const double *consts, _rgeo *g, int64_t *detail) noexcept nogil:
    """Read the geometry and check the tables' indices before anything is written."""
    cdef int64_t k, tab = f[LM_F_RESIZE_tab]
    g.P, g.H, g.W = f[LM_F_RESIZE_P], f[LM_F_RESIZE_H], f[LM_F_RESIZE_W]
    g.OH, g.OW, g.kh, g.kw = f[LM_F_RESIZE_OH], f[LM_F_RESIZE_OW], f[LM_F_RESIZE_kh], f[LM_F_RESIZE_kw]
    g.ext = f[LM_F_RESIZE_extrap]
    g.extv = consts[g.ext] if g.ext >= 0 else 0
    g.ih = consts + tab
    g.wh = g.ih + g.OH * g.kh
    g.iw = g.wh + g.OH * g.kh
    g.ww = g.iw + g.OW * g.kw
    for k in range(g.OH * g.kh):
        if _bad_tap(g.ih[k], g.H, g.ext >= 0 and k % g.kh == 0):
            detail[0] = k
            return ERR_INDEX
    for k in range(g.OW * g.kw):
        if _bad_tap(g.iw[k], g.W, g.ext >= 0 and k % g.kw == 0):
            detail[0] = 2 * g.OH * g.kh + k
            return ERR_INDEX
    return 0


cdef int _resize(floating dummy, const int64_t *f, char **bases, const double *consts, int64_t *detail,
                 int nthreads) noexcept nogil:
    cdef _rgeo g
    cdef int rc = _resize_geo(f, consts, &g, detail)
    if rc != 0:
        return rc
    cdef const floating *x = <const floating*>_ptr(bases, f + LM_F_RESIZE_x_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_RESIZE_y_slot)
    cdef int64_t r
    cdef int nt = _threads(g.P * g.OH * g.OW * g.kh * g.kw, nthreads)
    for r in prange(g.P * g.OH, num_threads=nt, schedule="static"):
        _resize_row(dummy, &g, x + (r // g.OH) * g.H * g.W, y + r * g.OW, r % g.OH)
    return 0


cdef void _resize_row(floating dummy, const _rgeo *g, const floating *x, floating *y, int64_t oh) noexcept nogil:
    cdef int64_t ow, i, j
    cdef const floating *row
    cdef const double *ihr = g.ih + oh * g.kh
    cdef const double *whr = g.wh + oh * g.kh
    cdef const double *iwc
    cdef const double *wwc
    cdef double s = 0, t
    if g.ext >= 0 and ihr[0] < 0:
        for ow in range(g.OW):
            y[ow] = <floating>g.extv
        return
    for ow in range(g.OW):
        iwc = g.iw + ow * g.kw
        wwc = g.ww + ow * g.kw
        if g.ext >= 0 and iwc[0] < 0:
            y[ow] = <floating>g.extv
            continue
        # each sum starts from its first term (not 0): a one-tap nearest resize is an exact copy, -0 included
        for i in range(g.kh):
            row = x + <int64_t>ihr[i] * g.W
            t = wwc[0] * row[<int64_t>iwc[0]]
            for j in range(1, g.kw):
                t = t + wwc[j] * row[<int64_t>iwc[j]]
            s = whr[0] * t if i == 0 else s + whr[i] * t
        y[ow] = <floating>s


cdef int _resize_grad(floating dummy, const int64_t *f, char **bases, const double *consts, int64_t *detail,
                      int nthreads) noexcept nogil:
    cdef _rgeo g
    cdef int rc = _resize_geo(f, consts, &g, detail)
    if rc != 0:
        return rc
    cdef const floating *dy = <const floating*>_ptr(bases, f + LM_F_RESIZE_GRAD_dy_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_RESIZE_GRAD_dx_slot)
    cdef int64_t p
    cdef int nt = _threads(g.P * g.OH * g.OW * g.kh * g.kw, nthreads)
    for p in prange(g.P, num_threads=nt, schedule="static"):
        _resize_grad_plane(dummy, &g, dy + p * g.OH * g.OW, dx + p * g.H * g.W)
    return 0


cdef void _resize_grad_plane(floating dummy, const _rgeo *g, const floating *dy, floating *dx) noexcept nogil:
    cdef int64_t oh, ow, i, j
    cdef floating *row
    cdef const double *ihr
    cdef const double *whr
    cdef const double *iwc
    cdef const double *wwc
    cdef double gv, a
    memset(dx, 0, <size_t>(g.H * g.W) * sizeof(floating))
    for oh in range(g.OH):
        ihr = g.ih + oh * g.kh
        whr = g.wh + oh * g.kh
        if g.ext >= 0 and ihr[0] < 0:
            continue
        for ow in range(g.OW):
            iwc = g.iw + ow * g.kw
            wwc = g.ww + ow * g.kw
            if g.ext >= 0 and iwc[0] < 0:
                continue
            gv = dy[oh * g.OW + ow]
            for i in range(g.kh):
                a = whr[i] * gv
                row = dx + <int64_t>ihr[i] * g.W
                for j in range(g.kw):
                    row[<int64_t>iwc[j]] += <floating>(wwc[j] * a)
