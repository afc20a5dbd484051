# Convolution kernels (format 2.3, opcodes 48-50: conv, conv_grad_input, conv_grad_weight), included by
# _exec.pyx.  NCHW; the geometry and the splits are described at the opcodes in format.py.
#
# GEMM-based path: per (image, group) the conv is W_g (Mg, Kc) @ col (Kc, P) with P = OH*OW output pixels
# and Kc = Cg*kh*kw.  col is never built whole: a task builds one panel of `panel` output pixels of it
# (im2col) in its thread's scratch panel, then calls BLAS on it.  BLAS runs single-threaded inside the
# runtime's OpenMP region (as _gemm does).  Every task's panel shapes, and so BLAS's blocking, depend only
# on the instruction's fields; a task's result does not depend on which thread (which scratch panel) ran
# it, so any thread count gives the same bits.
#
# Direct path (G > 1 and Cg == 1: depthwise convs and channel multipliers): plain loops, one task per
# output (image, channel) forward, per input (image, channel) for dx, per output channel for dw; each task
# sums in a fixed order.
#
# The forward's epilogue (_conv_epi_row) runs on each output row (one channel of one panel, or a whole
# plane on the direct path) right after it is computed: per-channel scale, bias, the kept pre-activation,
# then relu or any VM step (the GEMM's lm_vm_epilogue_row).  With `pre` the GEMM / the loops write into
# pre and the activation reads it from there into y, so keeping it costs no copy.

DEF CONV_PAR_FLOPS = 4000000   # below this a convolution runs on the calling thread (as GEMM_PAR_FLOPS)


cdef struct _cepi:
    # the forward's epilogue: act 0 none, 1 relu, 3 the VM step `vm`; b / scale per channel or NULL; pre:
    # the buffer the conv writes before the activation (NULL: y itself)
    int64_t act
    lm_epi vm
    const void *b
    const void *scale
    void *pre


cdef struct _cgeo:
    int64_t N, C, H, W, M, G, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, panel, nslots
    int64_t Cg, Mg, Kc, P, HW, npan, slot
    bint direct, pointwise


cdef inline void _conv_geo(const int64_t *f, _cgeo *g) noexcept nogil:
    g.N, g.C, g.H, g.W = f[LM_F_CONV_N], f[LM_F_CONV_C], f[LM_F_CONV_H], f[LM_F_CONV_W]
    g.M, g.G, g.kh, g.kw = f[LM_F_CONV_M], f[LM_F_CONV_G], f[LM_F_CONV_kh], f[LM_F_CONV_kw]
    g.sh, g.sw, g.ph, g.pw = f[LM_F_CONV_sh], f[LM_F_CONV_sw], f[LM_F_CONV_ph], f[LM_F_CONV_pw]
    g.dh, g.dw, g.OH, g.OW = f[LM_F_CONV_dh], f[LM_F_CONV_dw], f[LM_F_CONV_OH], f[LM_F_CONV_OW]
    g.panel, g.nslots = f[LM_F_CONV_panel], f[LM_F_CONV_nslots]
    g.Cg, g.Mg = g.C // g.G, g.M // g.G
    g.Kc = g.Cg * g.kh * g.kw
    g.P, g.HW = g.OH * g.OW, g.H * g.W
    g.npan = (g.P + g.panel - 1) // g.panel
    g.slot = (g.Kc * g.panel + 15) // 16 * 16   # elements per scratch panel (64-byte multiples)
    g.direct = g.G > 1 and g.Cg == 1
    # a 1x1 kernel with unit strides and no padding reads x itself as its im2col matrix (no copy)
    g.pointwise = (g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.ph == 0 and g.pw == 0
                   and g.OH == g.H and g.OW == g.W)


cdef inline void _cgemm(floating dummy, bint tra, bint trb, int m, int n, int k, floating *A, int lda,
                        floating *B, int ldb, floating beta, floating *C, int ldc) noexcept nogil:
    # row-major C(m, n) = op(A) op(B) + beta C == column-major C^T = op(B)^T op(A)^T.  Straight to BLAS
    # (not _blas: its row-vector shortcut assumes a contiguous A, and these A's are strided blocks)
    cdef floating one = 1
    cdef char ta = b'T' if tra else b'N'
    cdef char tb = b'T' if trb else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc)


cdef inline void _valid_span(int64_t a, int64_t s, int64_t W, int64_t n, int64_t *lo, int64_t *hi) noexcept nogil:
    """[lo, hi): the t in [0, n) with 0 <= a + t*s < W (s >= 1)."""
    cdef int64_t l = 0, h
    if a < 0:
        l = (-a + s - 1) // s
    if a > W - 1:
        h = 0
    else:
        h = (W - 1 - a) // s + 1
    if h > n:
        h = n
    if l > h:
        l = h
    lo[0] = l
    hi[0] = h


cdef void _im2col(floating dummy, const _cgeo *g, const floating *x, int64_t nc, int64_t p0, int64_t pn,
                  floating *col) noexcept nogil:
    """col[(c*kh + i)*kw + j, q] = x[c, ih, iw] (0 outside) for output pixel p0 + q, channels 0..nc of x."""
    cdef int64_t c, i, j, q, p, oh, ow, seg, ih, a, lo, hi, t
    cdef floating *r
    cdef const floating *xr
    for c in range(nc):
        for i in range(g.kh):
            for j in range(g.kw):
                r = col + ((c * g.kh + i) * g.kw + j) * pn
                q = 0
                p = p0
                while q < pn:
                    oh = p // g.OW
                    ow = p - oh * g.OW
                    seg = min(g.OW - ow, pn - q)
                    ih = oh * g.sh - g.ph + i * g.dh
                    if ih < 0 or ih >= g.H:
                        memset(r + q, 0, <size_t>seg * sizeof(floating))
                    else:
                        xr = x + c * g.HW + ih * g.W
                        a = ow * g.sw - g.pw + j * g.dw
                        _valid_span(a, g.sw, g.W, seg, &lo, &hi)
                        for t in range(lo):
                            r[q + t] = 0
                        if g.sw == 1:
                            memcpy(r + q + lo, xr + a + lo, <size_t>(hi - lo) * sizeof(floating))
                        else:
                            for t in range(lo, hi):
                                r[q + t] = xr[a + t * g.sw]
                        for t in range(hi, seg):
                            r[q + t] = 0
                    q += seg
                    p += seg


cdef void _col2im(floating dummy, const _cgeo *g, floating *dx, int64_t nc, int64_t p0, int64_t pn,
                  const floating *col) noexcept nogil:
    """dx[c, ih, iw] += col[(c*kh + i)*kw + j, q]: _im2col's adjoint, rows in order (a fixed sum order)."""
    cdef int64_t c, i, j, q, p, oh, ow, seg, ih, a, lo, hi, t
    cdef const floating *r
    cdef floating *xr
    for c in range(nc):
        for i in range(g.kh):
            for j in range(g.kw):
                r = col + ((c * g.kh + i) * g.kw + j) * pn
                q = 0
                p = p0
                while q < pn:
                    oh = p // g.OW
                    ow = p - oh * g.OW
                    seg = min(g.OW - ow, pn - q)
                    ih = oh * g.sh - g.ph + i * g.dh
                    if 0 <= ih < g.H:
                        xr = dx + c * g.HW + ih * g.W
                        a = ow * g.sw - g.pw + j * g.dw
                        _valid_span(a, g.sw, g.W, seg, &lo, &hi)
                        for t in range(lo, hi):
                            xr[a + t * g.sw] += r[q + t]
                    q += seg
                    p += seg


cdef inline int _conv_threads(const _cgeo *g, int64_t ntasks, int nthreads) noexcept nogil:
    """Threads for a conv: 1 below CONV_PAR_FLOPS, never more than the tasks or the scratch panels."""
    cdef double flops = 2.0 * g.N * g.M * g.P * g.Kc
    cdef int64_t nt = nthreads if flops >= CONV_PAR_FLOPS else 1
    if nt > ntasks:
        nt = ntasks
    if not g.direct and nt > g.nslots:
        nt = g.nslots
    return <int>(nt if nt >= 1 else 1)


# ------------------------------------------------------------------------------------------------
# forward

cdef int _conv(floating dummy, const int64_t *f, char **bases, const double *consts, int nthreads) noexcept nogil:
    cdef _cgeo g
    _conv_geo(f, &g)
    cdef const floating *x = <const floating*>_ptr(bases, f + LM_F_CONV_x_slot)
    cdef floating *w = <floating*>_ptr(bases, f + LM_F_CONV_w_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_CONV_y_slot)
    cdef floating *scratch = <floating*>_ptr(bases, f + LM_F_CONV_scratch_slot)
    cdef int64_t t, ntasks
    cdef floating *col
    cdef int nt
    cdef _cepi e
    e.act = f[LM_F_CONV_act]
    e.b = _ptr(bases, f + LM_F_CONV_b_slot) if f[LM_F_CONV_b_slot] >= 0 else NULL
    e.scale = _ptr(bases, f + LM_F_CONV_scale_slot) if f[LM_F_CONV_scale_slot] >= 0 else NULL
    e.pre = _ptr(bases, f + LM_F_CONV_pre_slot) if f[LM_F_CONV_pre_slot] >= 0 else NULL
    e.vm.vm, e.vm.b, e.vm.c, e.vm.bv, e.vm.cv = -1, 0, 0, 0, 0
    if e.act == 3:
        e.vm.vm, e.vm.b, e.vm.c = f[LM_F_CONV_epi_vm], f[LM_F_CONV_epi_b], f[LM_F_CONV_epi_c]
        if e.vm.b < 0:
            e.vm.bv = consts[-e.vm.b - 1]
        if e.vm.c < 0:
            e.vm.cv = consts[-e.vm.c - 1]
    if g.N == 0 or g.M == 0 or g.P == 0:
        return 0
    if g.direct:
        ntasks = g.N * g.M
        nt = _conv_threads(&g, ntasks, nthreads)
        for t in prange(ntasks, num_threads=nt, schedule="static"):
            _dw_fwd_task(dummy, &g, t // g.M, t % g.M, x, w, &e, y)
        return 0
    ntasks = g.N * g.G * g.npan
    nt = _conv_threads(&g, ntasks, nthreads)
    with parallel(num_threads=nt):
        col = scratch + threadid() * g.slot
        for t in prange(ntasks, schedule="static"):
            _conv_fwd_task(dummy, &g, t, x, w, &e, y, col)
    return 0


cdef void _conv_epi_row(floating dummy, const _cepi *e, int64_t m, floating *row, floating *yrow,
                        int64_t n) noexcept nogil:
    """The epilogue of n outputs of channel m: row (the conv's value; pre, or y itself when no pre is
    kept) = row * scale[m] + b[m], then yrow = act(row)."""
    cdef const floating *b = <const floating*>e.b
    cdef const floating *sc = <const floating*>e.scale
    cdef floating bv = b[m] if b != NULL else 0
    cdef floating sv
    cdef int64_t q
    if sc != NULL:
        sv = sc[m]
        if b != NULL:
            for q in range(n):
                row[q] = row[q] * sv + bv
        else:
            for q in range(n):
                row[q] = row[q] * sv
    if e.act == 1:
        if sc == NULL and b != NULL:
            for q in range(n):
                row[q] = row[q] + bv
                yrow[q] = 0 if row[q] < 0 else row[q]   # relu(NaN) = NaN, as the VM's RELU
        else:
            for q in range(n):
                yrow[q] = 0 if row[q] < 0 else row[q]
    elif e.act == 3:
        if sc == NULL and b != NULL:
            for q in range(n):
                row[q] = row[q] + bv
        _vm_epi_row(dummy, &e.vm, n, row, <floating*>NULL, <floating*>NULL, <floating*>NULL,
                    yrow if yrow != row else <floating*>NULL)
    elif sc == NULL and b != NULL:
        for q in range(n):
            row[q] = row[q] + bv


cdef void _conv_fwd_task(floating dummy, const _cgeo *g, int64_t t, const floating *x, floating *w,
                         const _cepi *e, floating *y, floating *col) noexcept nogil:
    cdef int64_t pi = t % g.npan, ng = t // g.npan
    cdef int64_t n = ng // g.G, gr = ng % g.G
    cdef int64_t p0 = pi * g.panel, pn = min(g.panel, g.P - p0), m, q
    cdef const floating *xi = x + (n * g.C + gr * g.Cg) * g.HW
    cdef int64_t off = (n * g.M + gr * g.Mg) * g.P + p0
    cdef floating *out = (<floating*>e.pre if e.pre != NULL else y) + off
    cdef floating *B
    cdef int ldb
    if g.pointwise:
        B = <floating*>xi + p0
        ldb = <int>g.P
    else:
        _im2col(dummy, g, xi, g.Cg, p0, pn, col)
        B = col
        ldb = <int>pn
    _cgemm(dummy, False, False, <int>g.Mg, <int>pn, <int>g.Kc, w + gr * g.Mg * g.Kc, <int>g.Kc, B, ldb, 0,
           out, <int>g.P)
    if e.b != NULL or e.scale != NULL or e.act != 0:
        for m in range(g.Mg):
            _conv_epi_row(dummy, e, gr * g.Mg + m, out + m * g.P, y + off + m * g.P, pn)


cdef void _dw_fwd_task(floating dummy, const _cgeo *g, int64_t n, int64_t m, const floating *x, const floating *w,
                       const _cepi *e, floating *y) noexcept nogil:
    """y[n, m] of a conv whose output channel m reads input channel m // Mg only: kernel taps in order,
    starting from the bias (without a per-channel scale: the bias is added after the sum otherwise),
    then the epilogue on the plane."""
    cdef const floating *xc = x + (n * g.C + m // g.Mg) * g.HW
    cdef const floating *wm = w + m * g.kh * g.kw
    cdef floating *yo = (<floating*>e.pre if e.pre != NULL else y) + (n * g.M + m) * g.P
    cdef floating *yy = y + (n * g.M + m) * g.P
    cdef const floating *b = <const floating*>e.b
    cdef floating bv = b[m] if b != NULL and e.scale == NULL else 0
    cdef _cepi rest
    cdef floating wv
    cdef floating *yr
    cdef const floating *xr
    cdef int64_t oh, i, j, ih, a, lo, hi, t, p
    for p in range(g.P):
        yo[p] = bv
    for oh in range(g.OH):
        yr = yo + oh * g.OW
        for i in range(g.kh):
            ih = oh * g.sh - g.ph + i * g.dh
            if ih < 0 or ih >= g.H:
                continue
            xr = xc + ih * g.W
            for j in range(g.kw):
                wv = wm[i * g.kw + j]
                a = j * g.dw - g.pw
                _valid_span(a, g.sw, g.W, g.OW, &lo, &hi)
                for t in range(lo, hi):
                    yr[t] += wv * xr[a + t * g.sw]
    # the bias is in already unless a scale comes first
    rest = e[0]
    if e.scale == NULL:
        rest.b = NULL
    if rest.act != 0 or rest.scale != NULL or rest.b != NULL:
        _conv_epi_row(dummy, &rest, m, yo, yy, g.P)


# ------------------------------------------------------------------------------------------------
# gradient with respect to the input

cdef int _conv_grad_input(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef _cgeo g
    _conv_geo(f, &g)
    cdef floating *w = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_INPUT_w_slot)
    cdef floating *dy = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_INPUT_dy_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_INPUT_dx_slot)
    cdef floating *scratch = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_INPUT_scratch_slot)
    cdef int64_t cblock = f[LM_F_CONV_GRAD_INPUT_cblock], ncb, t, ntasks
    cdef floating *col
    cdef int nt
    if g.N == 0 or g.C == 0 or g.HW == 0:
        return 0
    if g.direct:
        ntasks = g.N * g.C
        nt = _conv_threads(&g, ntasks, nthreads)
        for t in prange(ntasks, num_threads=nt, schedule="static"):
            _dw_dx_task(dummy, &g, t // g.C, t % g.C, w, dy, dx)
        return 0
    ncb = (g.Cg + cblock - 1) // cblock
    ntasks = g.N * g.G * ncb
    nt = _conv_threads(&g, ntasks, nthreads)
    with parallel(num_threads=nt):
        col = scratch + threadid() * g.slot
        for t in prange(ntasks, schedule="static"):
            _conv_dx_task(dummy, &g, t, ncb, cblock, w, dy, dx, col)
    return 0


cdef void _conv_dx_task(floating dummy, const _cgeo *g, int64_t t, int64_t ncb, int64_t cblock, floating *w,
                        floating *dy, floating *dx, floating *col) noexcept nogil:
    """dx of image n, group gr, input channels [c0, c0 + nc): owned by this task alone, accumulated
    over the panels in order."""
    cdef int64_t cb = t % ncb, ng = t // ncb
    cdef int64_t n = ng // g.G, gr = ng % g.G
    cdef int64_t c0 = cb * cblock, nc = min(cblock, g.Cg - c0), kb = nc * g.kh * g.kw
    cdef int64_t pi, p0, pn
    cdef floating *dxi = dx + (n * g.C + gr * g.Cg + c0) * g.HW
    cdef floating *A = w + gr * g.Mg * g.Kc + c0 * g.kh * g.kw   # W_g[:, block] (Mg, kb), row stride Kc
    cdef floating *dyi = dy + (n * g.M + gr * g.Mg) * g.P
    if nc <= 0:
        return
    if g.pointwise:
        # dx[block] (nc, P) = W_g[:, block]^T @ dy directly: each pixel is written once
        _cgemm(dummy, True, False, <int>kb, <int>g.P, <int>g.Mg, A, <int>g.Kc, dyi, <int>g.P, 0, dxi, <int>g.P)
        return
    memset(dxi, 0, <size_t>(nc * g.HW) * sizeof(floating))
    for pi in range(g.npan):
        p0 = pi * g.panel
        pn = min(g.panel, g.P - p0)
        _cgemm(dummy, True, False, <int>kb, <int>pn, <int>g.Mg, A, <int>g.Kc, dyi + p0, <int>g.P, 0, col, <int>pn)
        _col2im(dummy, g, dxi, nc, p0, pn, col)


cdef void _dw_dx_task(floating dummy, const _cgeo *g, int64_t n, int64_t c, const floating *w,
                      const floating *dy, floating *dx) noexcept nogil:
    """dx[n, c] of the direct path: the output channels of c's group, then the taps, in order."""
    cdef floating *dxc = dx + (n * g.C + c) * g.HW
    cdef const floating *wm
    cdef const floating *dyr
    cdef floating *xr
    cdef floating wv
    cdef int64_t m, oh, i, j, ih, a, lo, hi, t
    memset(dxc, 0, <size_t>g.HW * sizeof(floating))
    for m in range(c * g.Mg, (c + 1) * g.Mg):
        wm = w + m * g.kh * g.kw
        for oh in range(g.OH):
            dyr = dy + (n * g.M + m) * g.P + oh * g.OW
            for i in range(g.kh):
                ih = oh * g.sh - g.ph + i * g.dh
                if ih < 0 or ih >= g.H:
                    continue
                xr = dxc + ih * g.W
                for j in range(g.kw):
                    wv = wm[i * g.kw + j]
                    a = j * g.dw - g.pw
                    _valid_span(a, g.sw, g.W, g.OW, &lo, &hi)
                    for t in range(lo, hi):
                        xr[a + t * g.sw] += wv * dyr[t]


# ------------------------------------------------------------------------------------------------
# gradient with respect to the weight

cdef int _conv_grad_weight(floating dummy, const int64_t *f, char **bases, const double *consts,
                           int nthreads) noexcept nogil:
    cdef _cgeo g
    _conv_geo(f, &g)
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_WEIGHT_x_slot)
    cdef floating *dy = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_WEIGHT_dy_slot)
    cdef floating *dw = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_WEIGHT_dw_slot)
    cdef floating *scratch = <floating*>_ptr(bases, f + LM_F_CONV_GRAD_WEIGHT_scratch_slot)
    cdef int64_t nchunks = f[LM_F_CONV_GRAD_WEIGHT_nchunks], t, k, nw = g.M * g.Kc
    cdef bint sgd = f[LM_F_CONV_GRAD_WEIGHT_sgd] != 0
    cdef floating lr = 0, wd = 0
    cdef floating *col
    cdef floating *part
    cdef floating *gsum
    cdef int nt
    if nw == 0:
        return 0
    if sgd:
        lr = <floating>consts[f[LM_F_CONV_GRAD_WEIGHT_lr]]
        wd = <floating>consts[f[LM_F_CONV_GRAD_WEIGHT_weight_decay]]
    if g.direct:
        # (sgd: the gradient is summed into scratch, which the direct path has: see ops_conv._scratch)
        gsum = scratch if sgd else dw
        nt = _conv_threads(&g, g.M, nthreads)
        for t in prange(g.M, num_threads=nt, schedule="static"):
            _dw_dw_task(dummy, &g, t, x, dy, gsum)
        if sgd:
            _sgd_chunks(dummy, nw, dw, gsum, lr, wd, nthreads)
        return 0
    part = scratch + g.nslots * g.slot
    nt = _conv_threads(&g, nchunks, nthreads)
    with parallel(num_threads=nt):
        col = scratch + threadid() * g.slot
        for t in prange(nchunks, schedule="static"):
            _conv_dw_chunk(dummy, &g, t, nchunks, x, dy, part + t * nw, col)
    # the partials added in chunk order: element k's sum is the same for any split of k over threads
    # (sgd: into chunk 0's partial, element k reading only its own column of partials)
    gsum = part if sgd else dw
    nt = _threads(nw * nchunks, nthreads)
    for k in prange(nw, num_threads=nt, schedule="static"):
        gsum[k] = _chunk_sum(dummy, part, nw, nchunks, k)
    if sgd:
        _sgd_chunks(dummy, nw, dw, gsum, lr, wd, nthreads)
    return 0


cdef void _sgd_chunks(floating dummy, int64_t n, floating *p, floating *gr, floating lr, floating wd,
                      int nthreads) noexcept nogil:
    """p -= lr * (gr + wd * p) through the sgd_update kernel, over its chunks of 16384 (the same calls as
    _sgd makes for this param: the same bits)."""
    cdef int64_t nch = (n + 16383) // 16384, c, lo, hi
    for c in prange(nch, num_threads=_threads(n, nthreads), schedule="static"):
        lo = c * 16384
        hi = lo + 16384 if lo + 16384 < n else n
        if floating is float:
            lm_sgd_f32(hi - lo, p + lo, gr + lo, NULL, lr, 0, wd)
        else:
            lm_sgd_f64(hi - lo, p + lo, gr + lo, NULL, lr, 0, wd)


cdef inline floating _chunk_sum(floating dummy, const floating *part, int64_t nw, int64_t nchunks,
                                int64_t k) noexcept nogil:
    cdef floating s = part[k]
    cdef int64_t c
    for c in range(1, nchunks):
        s = s + part[c * nw + k]
    return s


cdef void _conv_dw_chunk(floating dummy, const _cgeo *g, int64_t c, int64_t nchunks, floating *x, floating *dy,
                         floating *part, floating *col) noexcept nogil:
    """part = sum over this chunk's (image, panel) items, in order, of dy_panel @ col_panel^T per group."""
    cdef int64_t items = g.N * g.npan
    cdef int64_t lo = items * c // nchunks, hi = items * (c + 1) // nchunks, it, n, pi, p0, pn, gr
    cdef floating *B
    cdef int ldb
    memset(part, 0, <size_t>(g.M * g.Kc) * sizeof(floating))
    for it in range(lo, hi):
        n = it // g.npan
        pi = it % g.npan
        p0 = pi * g.panel
        pn = min(g.panel, g.P - p0)
        for gr in range(g.G):
            if g.pointwise:
                B = x + (n * g.C + gr * g.Cg) * g.HW + p0
                ldb = <int>g.P
            else:
                _im2col(dummy, g, x + (n * g.C + gr * g.Cg) * g.HW, g.Cg, p0, pn, col)
                B = col
                ldb = <int>pn
            # part_g (Mg, Kc) += dy[n, g, :, panel] (Mg, pn) @ B^T (pn, Kc)
            _cgemm(dummy, False, True, <int>g.Mg, <int>g.Kc, <int>pn, dy + (n * g.M + gr * g.Mg) * g.P + p0,
                   <int>g.P, B, ldb, 1, part + gr * g.Mg * g.Kc, <int>g.Kc)


cdef void _dw_dw_task(floating dummy, const _cgeo *g, int64_t m, const floating *x, const floating *dy,
                      floating *dw) noexcept nogil:
    """dw[m, 0, i, j] of the direct path: a double sum over images, rows and columns, in order."""
    cdef int64_t c = m // g.Mg, n, oh, i, j, ih, a, lo, hi, t
    cdef const floating *xr
    cdef const floating *dyr
    cdef double acc
    for i in range(g.kh):
        for j in range(g.kw):
            acc = 0
            a = j * g.dw - g.pw
            _valid_span(a, g.sw, g.W, g.OW, &lo, &hi)
            for n in range(g.N):
                for oh in range(g.OH):
                    ih = oh * g.sh - g.ph + i * g.dh
                    if ih < 0 or ih >= g.H:
                        continue
                    xr = x + (n * g.C + c) * g.HW + ih * g.W
                    dyr = dy + (n * g.M + m) * g.P + oh * g.OW
                    for t in range(lo, hi):
                        acc += <double>dyr[t] * <double>xr[a + t * g.sw]
            dw[m * g.kh * g.kw + i * g.kw + j] = <floating>acc
