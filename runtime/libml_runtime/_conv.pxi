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

DEF CONV_PAR_FLOPS = 500000    # below this a convolution runs on the calling thread (see _conv_threads)


cdef struct _cepi:
    # the forward's epilogue: act 0 none, 1 relu, 3 the VM step `vm`; b / scale per channel or NULL; pre:
    # the buffer the conv writes before the activation (NULL: y itself)
    int64_t act
    lm_epi vm
    const void *b
    const void *scale
    void *pre
    # res: a tensor of y's shape added before the activation (NULL: none); y: y's base, so a row's
    # residual is res + (yrow - y)
    const void *res
    const void *y


cdef struct _csc:
    # conv_shortcut (format 2.7): x2 (N, C2, H2, W2) and w2 (M, C2), read at (oh * s2h, ow * s2w) and summed
    # into the accumulator after the conv's own taps; C2 = 0: a plain conv
    const void *x2
    const void *w2
    int64_t C2, H2, W2, s2h, s2w


cdef struct _cgeo:
    int64_t N, C, H, W, M, G, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, panel, nslots, algo, rb
    int64_t Cg, Mg, Kc, P, HW, npan, slot
    bint direct, pointwise


cdef inline bint _has_epi(const _cepi *e) noexcept nogil:
    """Whether the forward's epilogue does anything (bias, scale, residual or activation)."""
    return e.b != NULL or e.scale != NULL or e.act != 0 or e.res != NULL


cdef inline void _conv_geo(const int64_t *f, _cgeo *g) noexcept nogil:
    g.N, g.C, g.H, g.W = f[LM_F_CONV_N], f[LM_F_CONV_C], f[LM_F_CONV_H], f[LM_F_CONV_W]
    g.M, g.G, g.kh, g.kw = f[LM_F_CONV_M], f[LM_F_CONV_G], f[LM_F_CONV_kh], f[LM_F_CONV_kw]
    g.sh, g.sw, g.ph, g.pw = f[LM_F_CONV_sh], f[LM_F_CONV_sw], f[LM_F_CONV_ph], f[LM_F_CONV_pw]
    g.dh, g.dw, g.OH, g.OW = f[LM_F_CONV_dh], f[LM_F_CONV_dw], f[LM_F_CONV_OH], f[LM_F_CONV_OW]
    g.panel, g.nslots = f[LM_F_CONV_panel], f[LM_F_CONV_nslots]
    g.algo, g.rb = f[LM_F_CONV_algo], f[LM_F_CONV_rb]
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
    """Threads for a conv: 1 below CONV_PAR_FLOPS, never more than the tasks or the scratch panels.
    (CONV_PAR_FLOPS was 4 MFLOP, which ran W8's batch-1 stride-2 convs (2.4 MFLOP) and its stem (0.9) on
    one thread; at 0.5 MFLOP W8 batch 1 took 0.243 instead of 0.310 ms, alternating processes on AMD EPYC
    AVX2, 2 threads; 1 MFLOP gave 0.258, 0.2 MFLOP 0.261, where the 0.26-MFLOP 1x1 convs gain nothing.)"""
    cdef double flops = 2.0 * g.N * g.M * g.P * g.Kc
    cdef int64_t nt = nthreads if flops >= CONV_PAR_FLOPS else 1
    if nt > ntasks:
        nt = ntasks
    if not g.direct and nt > g.nslots:
        nt = g.nslots
    return <int>(nt if nt >= 1 else 1)


# ------------------------------------------------------------------------------------------------
# forward

cdef int _conv(floating dummy, const int64_t *f, char **bases, const double *consts, int nthreads,
               bint shortcut=False) noexcept nogil:
    """conv, and conv_shortcut (shortcut: its fields after conv's; G = 1, algo 1 or 2, no res)."""
    cdef _cgeo g
    _conv_geo(f, &g)
    cdef _csc sc
    sc.C2, sc.x2, sc.w2 = 0, NULL, NULL
    if shortcut:
        sc.C2, sc.H2, sc.W2 = f[LM_F_CONV_SHORTCUT_C2], f[LM_F_CONV_SHORTCUT_H2], f[LM_F_CONV_SHORTCUT_W2]
        sc.s2h, sc.s2w = f[LM_F_CONV_SHORTCUT_s2h], f[LM_F_CONV_SHORTCUT_s2w]
        sc.x2 = _ptr(bases, f + LM_F_CONV_SHORTCUT_x2_slot)
        sc.w2 = _ptr(bases, f + LM_F_CONV_SHORTCUT_w2_slot)
        # (the validator refuses these; the kernels below read x2 only at checked coordinates)
        if (g.G != 1 or (g.algo != 1 and g.algo != 2) or f[LM_F_CONV_res_slot] >= 0 or sc.C2 < 1
                or sc.s2h < 1 or sc.s2w < 1 or (g.OH - 1) * sc.s2h >= sc.H2 or (g.OW - 1) * sc.s2w >= sc.W2):
            return ERR_MALFORMED
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
    e.res = _ptr(bases, f + LM_F_CONV_res_slot) if f[LM_F_CONV_res_slot] >= 0 else NULL
    e.y = y
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
    if g.algo == 1:
        return _conv_tiled(dummy, &g, <floating*>x, w, y, &e, scratch, nthreads, &sc)
    if g.algo == 2:
        return _conv_ocv(dummy, &g, <floating*>x, w, y, &e, scratch, nthreads, &sc)
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
    kept) = row * scale[m] + b[m] + res (the residual row at yrow's place), then yrow = act(row).  The
    additions run in that order, the unfused graph's (conv + b, then + res), so the bits are its bits."""
    cdef const floating *b = <const floating*>e.b
    cdef const floating *sc = <const floating*>e.scale
    cdef const floating *r = NULL
    cdef floating bv = b[m] if b != NULL else 0
    cdef floating sv
    cdef int64_t q
    cdef bint pending = sc == NULL and b != NULL   # the bias still to add (merged into the next loop)
    if e.res != NULL:
        r = <const floating*>e.res + (yrow - <const floating*>e.y)
    if sc != NULL:
        sv = sc[m]
        if b != NULL:
            for q in range(n):
                row[q] = row[q] * sv + bv
        else:
            for q in range(n):
                row[q] = row[q] * sv
    if r != NULL:
        if pending:
            for q in range(n):
                row[q] = row[q] + bv + r[q]
        else:
            for q in range(n):
                row[q] = row[q] + r[q]
        pending = False
    if e.act == 1:
        if pending:
            for q in range(n):
                row[q] = row[q] + bv
                yrow[q] = 0 if row[q] < 0 else row[q]   # relu(NaN) = NaN, as the VM's RELU
        else:
            for q in range(n):
                yrow[q] = 0 if row[q] < 0 else row[q]
    elif e.act == 3:
        if pending:
            for q in range(n):
                row[q] = row[q] + bv
        _vm_epi_row(dummy, &e.vm, n, row, <floating*>NULL, <floating*>NULL, <floating*>NULL,
                    yrow if yrow != row else <floating*>NULL)
    elif pending:
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
    if _has_epi(e):
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
    if _has_epi(&rest):
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
    if g.algo == 1:
        return _conv_grad_input_tiled(dummy, &g, w, dy, dx, scratch, nthreads)
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
    if g.algo == 1:
        return _conv_grad_weight_tiled(dummy, &g, x, dy, dw, sgd, lr, wd, nchunks, scratch, nthreads)
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


# ------------------------------------------------------------------------------------------------
# the tiled path (algo 1, format 2.4): kernels_conv.h's microkernels over shifted-row tiles
#
# One generic "tap convolution" per group: out[o, u, v] = sum_{ch < Ci, t < kh*kw} wt(o, ch, t) *
# in[ch, u*sh + r_t, v*sw + c_t], r_t = i*dh - ph, c_t = j*dw - pw (t = i*kw + j; in reads 0 outside
# [0, Hi) x [0, Wi)).  The forward is that with in = x, wt = W; conv_grad_input at stride 1 is it with in =
# dy, out = dx, the kernel flipped and transposed (wt(c, m, t') = W[m, c, kh-1-i', kw-1-j']) and the pads
# (kh-1)*dh - ph, (kw-1)*dw - pw.  With rho_t = floor(r_t / sh), a_t = r_t mod sh (and sigma_t, b_t for
# columns) input row u*sh + r_t is row u + rho_t of stride phase a_t, so a tile tile[ch][a][b][R][col] =
# in[ch, (u0 + rho_min + R)*sh + a, (sigma_min + col)*sw + b] makes every tap a constant offset off[k]
# from virtual pixel q = (u - u0)*Wq + v; the columns v >= V of each virtual row are junk (dropped;
# zero in the weight gradient's dyT, so they add nothing).
#
# scratch (elements of the plan's dtype, in this order): off (Kp int64s, rounded up to 16 elements), the
# weights of the input gradient (G blocks of Co x Kc rows, flipped; the region is G*Mp*Kc rounded up to 16, reserved for the forward too, which reads W itself), nslots
# thread slots of `panel` elements (tile, then the output tile Mp*Qp or the weight gradient's dyT
# Qp*Mv), then (weight gradient) nchunks partials of G*Kp*Mv and, with sgd, the summed gradient M*Kc.
# conv_layout.py computes the same sizes; _tiled_scratch_ok checks `panel` against them.

DEF TG_MR = 4      # kernels_conv.h LM_CV_MR: output channels per forward microkernel
DEF TG_KR = 12     # the weight gradient's k tiles (a multiple of every ISA copy's LM_CV_DW_KR)
DEF TG_MV = 16     # the weight gradient's channel padding (a multiple of every copy's vector block)


cdef struct _tg:
    int64_t Ci, Hi, Wi, Co, U, V, sh, sw, kh, kw, dh, dw, ph, pw, rb, nrb
    int64_t rmin, cmin, Rq, Wq, nph, Kc, Kp, Mp, Mv, tile_n, Qp, noff, nwp
    # Km = Ci*kh*kw the conv's own taps, Kc = Km + C2 (conv_shortcut's channels, tile[t0 + c*Qp + q] for
    # virtual pixel q); t0 the end of the built tile
    int64_t Km, C2, t0
    # where output (u, v) goes: row oa + osh*u, column ob + osw*v of planes OHt x OWt (identity but for
    # the phases of a stride-s input gradient); the input gradient's weight taps i0 - i'*ist, j0 - j'*jst
    int64_t oa, ob, osh, osw, OHt, OWt, i0, ist, j0, jst


cdef inline int64_t _fdiv(int64_t a, int64_t b) noexcept nogil:
    """floor(a / b) for b > 0 (cdivision truncates)."""
    cdef int64_t q = a / b
    if a % b != 0 and a < 0:
        q -= 1
    return q


cdef inline int64_t _r16(int64_t n) noexcept nogil:
    return (n + 15) // 16 * 16


cdef void _tg_init(_tg *t, int64_t Ci, int64_t Hi, int64_t Wi, int64_t Co, int64_t U, int64_t V, int64_t sh,
                   int64_t sw, int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t ph, int64_t pw,
                   int64_t rb, int64_t isz) noexcept nogil:
    t.Ci, t.Hi, t.Wi, t.Co, t.U, t.V = Ci, Hi, Wi, Co, U, V
    t.sh, t.sw, t.kh, t.kw, t.dh, t.dw, t.ph, t.pw = sh, sw, kh, kw, dh, dw, ph, pw
    t.rb = rb if rb >= 1 else 1
    t.nrb = (U + t.rb - 1) // t.rb
    t.rmin = _fdiv(-ph, sh)
    t.cmin = _fdiv(-pw, sw)
    t.Rq = t.rb + _fdiv((kh - 1) * dh - ph, sh) - t.rmin
    t.Wq = V + _fdiv((kw - 1) * dw - pw, sw) - t.cmin
    t.nph = sh * sw
    t.Km = Ci * kh * kw
    t.C2 = 0
    t.Kc = t.Km
    t.Kp = (t.Kc + TG_KR - 1) // TG_KR * TG_KR
    t.Mp = (Co + TG_MR - 1) // TG_MR * TG_MR
    t.Mv = (Co + TG_MV - 1) // TG_MV * TG_MV
    t.tile_n = _r16(Ci * t.nph * t.Rq * t.Wq + t.Wq + 32)
    t.t0 = t.tile_n
    t.Qp = _r16(t.rb * t.Wq)
    t.noff = _r16((t.Kp * 8 + isz - 1) // isz)
    t.oa, t.ob, t.osh, t.osw, t.OHt, t.OWt = 0, 0, 1, 1, U, V
    t.i0, t.ist, t.j0, t.jst = kh - 1, 1, kw - 1, 1


cdef void _tg_add_shortcut(_tg *t, int64_t C2, int64_t isz) noexcept nogil:
    """conv_shortcut's C2 channels as C2 more taps after the tile (conv_layout._tiles1's C2)."""
    t.C2 = C2
    t.Kc = t.Km + C2
    t.Kp = (t.Kc + TG_KR - 1) // TG_KR * TG_KR
    t.tile_n = t.t0 + C2 * t.Qp
    t.noff = _r16((t.Kp * 8 + isz - 1) // isz)


cdef void _tg_offsets(const _tg *t, int64_t *off) noexcept nogil:
    cdef int64_t ch, i, j, r, c, k = 0
    for ch in range(t.Ci):
        for i in range(t.kh):
            r = i * t.dh - t.ph
            for j in range(t.kw):
                c = j * t.dw - t.pw
                off[k] = (((ch * t.sh + (r - _fdiv(r, t.sh) * t.sh)) * t.sw + (c - _fdiv(c, t.sw) * t.sw))
                          * t.Rq + (_fdiv(r, t.sh) - t.rmin)) * t.Wq + (_fdiv(c, t.sw) - t.cmin)
                k += 1
    for k in range(t.Km, t.Kc):
        off[k] = t.t0 + (k - t.Km) * t.Qp
    for k in range(t.Kc, t.Kp):
        off[k] = 0


cdef inline void _tg_build(floating dummy, const _tg *t, const floating *src, int64_t u0, floating *tile) noexcept nogil:
    """tile[ch][a][b][R][col] = src[ch, (u0 + rmin + R)*sh + a, (cmin + col)*sw + b] (0 outside), all
    phases (so a junk read that runs past a plane lands on built values), then zeros to t0
    (kernels_conv.h lm_conv_build)."""
    if floating is float:
        lm_conv_build_f32(src, t.Ci, t.Hi, t.Wi, t.sh, t.sw, u0 + t.rmin, t.Rq, t.cmin, t.Wq, t.t0, tile)
    else:
        lm_conv_build_f64(src, t.Ci, t.Hi, t.Wi, t.sh, t.sw, u0 + t.rmin, t.Rq, t.cmin, t.Wq, t.t0, tile)


cdef void _tg_build_shortcut(floating dummy, const _tg *t, const _csc *sc, int64_t n, int64_t u0, int64_t nrows,
                             floating *tile) noexcept nogil:
    """tile[t0 + c*Qp + r*Wq + v] = x2[n, c, (u0 + r)*s2h, v*s2w] for r < nrows, v < V; zero at the junk
    columns and rows up to Qp (read by junk pixels only, kept finite)."""
    cdef const floating *x2 = <const floating*>sc.x2
    cdef floating *o
    cdef const floating *xr
    cdef int64_t c, r, v
    for c in range(t.C2):
        o = tile + t.t0 + c * t.Qp
        for r in range(nrows):
            xr = x2 + ((n * t.C2 + c) * sc.H2 + (u0 + r) * sc.s2h) * sc.W2
            for v in range(t.V):
                o[r * t.Wq + v] = xr[v * sc.s2w]
            for v in range(t.V, t.Wq):
                o[r * t.Wq + v] = 0
        for v in range(nrows * t.Wq, t.Qp):
            o[v] = 0


cdef inline void _tg_mk(floating dummy, int64_t Mp, int64_t Co, int64_t Qp, int64_t K, const floating *w,
                        int64_t K2, const floating *w2, const int64_t *off, const floating *tile, floating *out,
                        int64_t ldo) noexcept nogil:
    """The tile's product: rows of w (K each), then of w2 (K2 each, conv_shortcut; K2 = 0: none) over the
    taps off[K ..]."""
    if floating is float:
        lm_conv_tile_f32(Mp, Co, Qp, K, w, K, K2, w2, K2, off, tile, out, ldo)
    else:
        lm_conv_tile_f64(Mp, Co, Qp, K, w, K, K2, w2, K2, off, tile, out, ldo)


cdef bint _tiled_scratch_ok(const _tg *t, int64_t G, int64_t slot, bint dw) noexcept nogil:
    return slot >= t.tile_n + (t.Qp * t.Mv if dw else t.Mp * t.Qp) and slot % 16 == 0


cdef void _tg_pack_dx(floating dummy, const _tg *t, int64_t G, int64_t kh, int64_t kw, const floating *w,
                      floating *wp) noexcept nogil:
    """The input gradient's weights as the rows the forward kernel reads, wt[g][c][k] (G blocks of Co x Kc):
    output c (of Co = C/G), input m (of Ci = M/G), taps (i', j') of the conv's kh x kw kernel at
    i = i0 - i'*ist, j = j0 - j'*jst (stride 1: flipped): wt(c, m, i', j') = W[g*Ci + m, c, i, j]."""
    cdef int64_t g, o, m, i, j, ntap = kh * kw
    for g in range(G):
        for o in range(t.Co):
            for m in range(t.Ci):
                for i in range(t.kh):
                    for j in range(t.kw):
                        wp[(g * t.Co + o) * t.Kc + (m * t.kh + i) * t.kw + j] = \
                            w[((g * t.Ci + m) * t.Co + o) * ntap + (t.i0 - i * t.ist) * kw + (t.j0 - j * t.jst)]


cdef int _tiled_apply(floating dummy, const _tg *t, int64_t N, int64_t G, const floating *src, const floating *wt,
                      floating *dst, floating *pre_or_dst, const _cepi *e, floating *scratch, int64_t slot,
                      int nt, const _csc *sc=NULL) noexcept nogil:
    """out = the tap convolution of src (N, G*Ci, Hi, Wi) with the weight rows wt (G blocks of Co x Kc) into
    pre_or_dst (N, G*Co, U, V), one task per (image, group, row block); with an epilogue e (forward) each
    output row then runs it into dst.  The offsets are at scratch, the slots after the packed-weight region.
    With a shortcut sc (conv_shortcut, G = 1) each tile also gets the shortcut's channels and the product
    runs on over sc.w2's rows (Co x C2) after wt's."""
    cdef int64_t *off = <int64_t*>scratch
    cdef floating *slots = scratch + t.noff + _r16(G * t.Mp * t.Kc)
    cdef int64_t ntasks = N * G * t.nrb, k
    cdef floating *tile
    with parallel(num_threads=nt):
        tile = slots + threadid() * slot
        for k in prange(ntasks, schedule="static"):
            _tiled_task(dummy, t, k, G, src, dst, pre_or_dst, e, off, wt, tile, tile + t.tile_n, sc)
    return 0


cdef void _tiled_task(floating dummy, const _tg *t, int64_t k, int64_t G, const floating *src, floating *dst,
                      floating *pre_or_dst, const _cepi *e, const int64_t *off, const floating *wp,
                      floating *tile, floating *out, const _csc *sc) noexcept nogil:
    cdef int64_t rbi = k % t.nrb, ng = k // t.nrb
    cdef int64_t n = ng // G, gr = ng % G
    cdef int64_t u0 = rbi * t.rb, nrows = min(t.rb, t.U - u0), r, m, Qp
    cdef floating *o
    cdef floating *y
    _tg_build(dummy, t, src + (n * G + gr) * t.Ci * t.Hi * t.Wi, u0, tile)
    if sc != NULL:
        _tg_build_shortcut(dummy, t, sc, n, u0, nrows, tile)
    Qp = _r16(nrows * t.Wq)
    _tg_mk(dummy, t.Mp, t.Co, Qp, t.Km, wp + gr * t.Co * t.Km, t.C2,
           <const floating*>sc.w2 if sc != NULL else wp, off, tile, out, t.Qp)
    cdef int64_t v
    cdef const floating *src_row
    cdef bint epi = e != NULL and _has_epi(e)
    # the forward with an activation and no kept pre-activation: the epilogue reads the output tile and
    # writes y once (instead of a copy into y and a pass over it); rows of >= 32 (shorter rows: the fixed
    # cost per call wins, as algo 2 found for 8x8 images)
    cdef bint direct_epi = epi and e.act != 0 and e.pre == NULL and dst == pre_or_dst and t.V >= 32
    for m in range(t.Co):
        if direct_epi:
            for r in range(nrows):
                _conv_epi_row(dummy, e, gr * t.Co + m, out + m * t.Qp + r * t.Wq,
                              dst + (((n * G + gr) * t.Co + m) * t.U + u0 + r) * t.V, t.V)
            continue
        for r in range(nrows):
            o = pre_or_dst + ((n * G + gr) * t.Co + m) * t.OHt * t.OWt + (t.oa + t.osh * (u0 + r)) * t.OWt + t.ob
            src_row = out + m * t.Qp + r * t.Wq
            if t.osw == 1:
                memcpy(o, src_row, <size_t>t.V * sizeof(floating))
            else:
                for v in range(t.V):
                    o[v * t.osw] = src_row[v]
        if epi:
            # (the forward's output is y itself, U x V: the block's rows of channel m are contiguous, one
            # epilogue call over them rather than one per row)
            o = pre_or_dst + (((n * G + gr) * t.Co + m) * t.U + u0) * t.V
            y = dst + (((n * G + gr) * t.Co + m) * t.U + u0) * t.V
            _conv_epi_row(dummy, e, gr * t.Co + m, o, y, nrows * t.V)


cdef int _conv_tiled(floating dummy, const _cgeo *g, floating *x, floating *w, floating *y, const _cepi *e,
                     floating *scratch, int nthreads, const _csc *sc) noexcept nogil:
    cdef _tg t
    _tg_init(&t, g.Cg, g.H, g.W, g.Mg, g.OH, g.OW, g.sh, g.sw, g.kh, g.kw, g.dh, g.dw, g.ph, g.pw, g.rb,
             sizeof(floating))
    if sc.C2 > 0:
        _tg_add_shortcut(&t, sc.C2, sizeof(floating))
    if not _tiled_scratch_ok(&t, g.G, g.panel, False):
        return ERR_MALFORMED
    _tg_offsets(&t, <int64_t*>scratch)
    return _tiled_apply(dummy, &t, g.N, g.G, x, w, y, <floating*>e.pre if e.pre != NULL else y, e, scratch,
                        g.panel, _conv_threads(g, g.N * g.G * t.nrb, nthreads), sc if sc.C2 > 0 else NULL)


cdef void _dx_taps(int64_t k, int64_t s, int64_t d, int64_t p, int64_t a, int64_t *cnt, int64_t *i0,
                   int64_t *ist, int64_t *dd, int64_t *pp) noexcept nogil:
    """conv_layout._taps: the kernel taps i < k reaching output phase a of a stride-s input gradient."""
    cdef int64_t i, g = s, r = d, tmp
    cnt[0], i0[0], ist[0], dd[0], pp[0] = 0, 0, 1, 1, 0
    for i in range(k):
        tmp = a + p - i * d
        if tmp - _fdiv(tmp, s) * s == 0:
            cnt[0] += 1
            i0[0] = i
    if cnt[0] == 0:
        return
    while r != 0:   # gcd(s, d)
        tmp = g % r
        g = r
        r = tmp
    ist[0] = s // g
    dd[0] = d // g
    pp[0] = -_fdiv(a + p - i0[0] * d, s)


cdef int _conv_grad_input_tiled(floating dummy, const _cgeo *g, floating *w, floating *dy, floating *dx,
                                floating *scratch, int nthreads) noexcept nogil:
    """Stride 1: one tap convolution of dy with the flipped kernel.  Stride s: dx is zeroed, then each
    output phase (a, b) of dx that some tap reaches is a stride-1 tap convolution of dy with those taps
    (conv_layout.phases), the phases one after the other (each in parallel over its tasks)."""
    cdef _tg t
    cdef int64_t a, b, ka, kb, i0, j0, ist, jst, dh, dw, ph, pw, U, V
    if g.sh == 1 and g.sw == 1:
        _tg_init(&t, g.Mg, g.OH, g.OW, g.Cg, g.H, g.W, 1, 1, g.kh, g.kw, g.dh, g.dw, (g.kh - 1) * g.dh - g.ph,
                 (g.kw - 1) * g.dw - g.pw, g.rb, sizeof(floating))
        if not _tiled_scratch_ok(&t, g.G, g.panel, False):
            return ERR_MALFORMED
        _tg_offsets(&t, <int64_t*>scratch)
        _tg_pack_dx(dummy, &t, g.G, g.kh, g.kw, w, scratch + t.noff)
        return _tiled_apply(dummy, &t, g.N, g.G, dy, scratch + t.noff, dx, dx, NULL, scratch, g.panel,
                            _conv_threads(g, g.N * g.G * t.nrb, nthreads))
    _zero(dummy, dx, g.N * g.C * g.HW, nthreads)
    for a in range(min(g.sh, g.H)):
        _dx_taps(g.kh, g.sh, g.dh, g.ph, a, &ka, &i0, &ist, &dh, &ph)
        for b in range(min(g.sw, g.W)):
            _dx_taps(g.kw, g.sw, g.dw, g.pw, b, &kb, &j0, &jst, &dw, &pw)
            if ka == 0 or kb == 0:
                continue
            U = (g.H - a + g.sh - 1) // g.sh
            V = (g.W - b + g.sw - 1) // g.sw
            _tg_init(&t, g.Mg, g.OH, g.OW, g.Cg, U, V, 1, 1, ka, kb, dh, dw, ph, pw, g.rb, sizeof(floating))
            t.oa, t.ob, t.osh, t.osw, t.OHt, t.OWt = a, b, g.sh, g.sw, g.H, g.W
            t.i0, t.ist, t.j0, t.jst = i0, ist, j0, jst
            if not _tiled_scratch_ok(&t, g.G, g.panel, False):
                return ERR_MALFORMED
            _tg_offsets(&t, <int64_t*>scratch)
            _tg_pack_dx(dummy, &t, g.G, g.kh, g.kw, w, scratch + t.noff)
            _tiled_apply(dummy, &t, g.N, g.G, dy, scratch + t.noff, dx, dx, NULL, scratch, g.panel,
                         _conv_threads(g, g.N * g.G * t.nrb, nthreads))
    return 0


cdef void _zero(floating dummy, floating *p, int64_t n, int nthreads) noexcept nogil:
    cdef int64_t nch = (n + 65535) // 65536, c, lo
    for c in prange(nch, num_threads=_threads(n, nthreads), schedule="static"):
        lo = c * 65536
        memset(p + lo, 0, <size_t>(min(n - lo, 65536)) * sizeof(floating))


cdef int _conv_grad_weight_tiled(floating dummy, const _cgeo *g, floating *x, floating *dy, floating *dw,
                                 bint sgd, floating lr, floating wd, int64_t nchunks, floating *scratch,
                                 int nthreads) noexcept nogil:
    """part_c[g][k][m] = sum over chunk c's (image, row block) items, in order, of the tile products;
    then dw[g*Mg + m, k] = the partials added in chunk order (sgd: into a gradient, then the step)."""
    cdef _tg t
    _tg_init(&t, g.Cg, g.H, g.W, g.Mg, g.OH, g.OW, g.sh, g.sw, g.kh, g.kw, g.dh, g.dw, g.ph, g.pw, g.rb,
             sizeof(floating))
    if not _tiled_scratch_ok(&t, g.G, g.panel, True):
        return ERR_MALFORMED
    cdef int64_t *off = <int64_t*>scratch
    cdef floating *slots = scratch + t.noff
    cdef int64_t npart = g.G * t.Kp * t.Mv
    cdef floating *part = slots + g.nslots * g.panel
    cdef floating *gsum = part + nchunks * npart
    cdef int64_t c, k, i, gr, m, nw = g.M * t.Kc
    cdef floating s
    cdef floating *tile
    cdef floating *dest
    _tg_offsets(&t, off)
    cdef int nt = _conv_threads(g, nchunks, nthreads)
    with parallel(num_threads=nt):
        tile = slots + threadid() * g.panel
        for c in prange(nchunks, schedule="static"):
            _tiled_dw_chunk(dummy, &t, g, c, nchunks, x, dy, off, tile, tile + t.tile_n, part + c * npart)
    dest = gsum if sgd else dw
    for i in prange(nw, num_threads=_threads(nw * nchunks, nthreads), schedule="static"):
        m = i // t.Kc   # (global output channel)
        k = i % t.Kc
        gr = m // g.Mg
        s = part[(gr * t.Kp + k) * t.Mv + m % g.Mg]
        for c in range(1, nchunks):
            s = s + part[c * npart + (gr * t.Kp + k) * t.Mv + m % g.Mg]
        dest[i] = s
    if sgd:
        _sgd_chunks(dummy, nw, dw, gsum, lr, wd, nthreads)
    return 0


cdef void _tiled_dw_chunk(floating dummy, const _tg *t, const _cgeo *g, int64_t c, int64_t nchunks,
                          const floating *x, const floating *dy, const int64_t *off, floating *tile,
                          floating *dyT, floating *part) noexcept nogil:
    cdef int64_t items = g.N * t.nrb
    cdef int64_t lo = items * c // nchunks, hi = items * (c + 1) // nchunks, it, n, u0, nrows, gr, r, v, m, q
    cdef const floating *dyr
    memset(part, 0, <size_t>(g.G * t.Kp * t.Mv) * sizeof(floating))
    for it in range(lo, hi):
        n = it // t.nrb
        u0 = (it % t.nrb) * t.rb
        nrows = min(t.rb, t.U - u0)
        for gr in range(g.G):
            _tg_build(dummy, t, x + (n * g.G + gr) * t.Ci * t.Hi * t.Wi, u0, tile)
            # dyT[q][m] = dy[n, gr*Mg + m, u0 + r, v] at q = r*Wq + v (v < V), 0 at junk pixels / channels
            memset(dyT, 0, <size_t>(nrows * t.Wq * t.Mv) * sizeof(floating))
            for m in range(t.Co):
                for r in range(nrows):
                    dyr = dy + (((n * g.G + gr) * t.Co + m) * t.U + u0 + r) * t.V
                    q = r * t.Wq
                    for v in range(t.V):
                        dyT[(q + v) * t.Mv + m] = dyr[v]
            if floating is float:
                lm_conv_dw_tile_f32(t.Mv, t.Kp, nrows * t.Wq, dyT, off, tile, part + gr * t.Kp * t.Mv)
            else:
                lm_conv_dw_tile_f64(t.Mv, t.Kp, nrows * t.Wq, dyT, off, tile, part + gr * t.Kp * t.Mv)


# ------------------------------------------------------------------------------------------------
# algo 2 (format 2.5): the channel-vector forward (kernels_conv.h lm_conv_ocv).  Scratch: the tap offsets
# (noff elements), the packed weights wt[g][m // 16][k][m % 16] (zero for padded channels), then `nslots` slots of
# `panel` elements: the block's zero-padded input tile (tile_n) and its output, pixel-major (r24(rb*V) x Mv).
# conv_layout.ocv is the compiler's and the validator's copy of these sizes.

cdef struct _og:
    int64_t Ci, Hi, Wi, Co, U, V, sh, sw, kh, kw, dh, dw, ph, pw, rb, nrb, Rt, Wt, Kc, Mv, tile_n, Pq, noff
    bint inplace   # every tap inside the input (no padding read): the kernel reads x itself, no tile
    # conv_shortcut: Km = Ci*kh*kw the conv's taps, Kc = Km + C2; the shortcut's channel c at tile[t0 +
    # c*Rs*Wt + r*sh*Wt + v*sw] for the block's output pixel (r, v) (where the taps address it)
    int64_t Km, C2, Rs, t0


cdef void _og_init(_og *t, const _cgeo *g, int64_t isz, int64_t C2) noexcept nogil:
    t.Ci, t.Hi, t.Wi, t.Co, t.U, t.V = g.Cg, g.H, g.W, g.Mg, g.OH, g.OW
    t.sh, t.sw, t.kh, t.kw, t.dh, t.dw, t.ph, t.pw = g.sh, g.sw, g.kh, g.kw, g.dh, g.dw, g.ph, g.pw
    t.rb = g.rb if g.rb >= 1 else 1
    t.nrb = (t.U + t.rb - 1) // t.rb
    t.inplace = (C2 == 0 and t.ph == 0 and t.pw == 0 and (t.U - 1) * t.sh + (t.kh - 1) * t.dh < t.Hi
                 and (t.V - 1) * t.sw + (t.kw - 1) * t.dw < t.Wi)
    if t.inplace:   # the "tile" is the image itself: rows of Wi, Hi rows per channel
        t.Rt, t.Wt = t.Hi, t.Wi
    else:
        t.Rt = (t.rb - 1) * t.sh + (t.kh - 1) * t.dh + 1
        t.Wt = (t.V - 1) * t.sw + (t.kw - 1) * t.dw + 1
    t.Km = t.Ci * t.kh * t.kw
    t.C2 = C2
    t.Kc = t.Km + C2
    t.Rs = (t.rb - 1) * t.sh + 1
    t.Mv = (t.Co + TG_MV - 1) // TG_MV * TG_MV
    t.t0 = 0 if t.inplace else _r16(t.Ci * t.Rt * t.Wt)
    t.tile_n = t.t0 + (_r16(C2 * t.Rs * t.Wt) if C2 > 0 else 0)
    t.Pq = (t.rb * t.V + 23) // 24 * 24
    t.noff = _r16((t.Kc * 8 + isz - 1) // isz)


cdef int _conv_ocv(floating dummy, const _cgeo *g, floating *x, floating *w, floating *y, const _cepi *e,
                   floating *scratch, int nthreads, const _csc *sc) noexcept nogil:
    """y = conv(x, w) + epilogue, one task per (image, group, block of rb output rows): build the block's
    padded input tile, run lm_conv_ocv over it, then write each output row (channel-major) and its
    epilogue.  Every split depends on the fields only (bit-identical for any thread count)."""
    cdef _og t
    _og_init(&t, g, sizeof(floating), sc.C2)
    if g.panel < t.tile_n + t.Pq * t.Mv or g.panel % 16 != 0:
        return ERR_MALFORMED
    cdef int64_t *off = <int64_t*>scratch
    cdef floating *wt = scratch + t.noff
    cdef floating *slots = wt + g.G * t.Kc * t.Mv
    cdef int64_t ch, i, j, k = 0, ntasks = g.N * g.G * t.nrb
    for ch in range(t.Ci):
        for i in range(t.kh):
            for j in range(t.kw):
                off[k] = (ch * t.Rt + i * t.dh) * t.Wt + j * t.dw
                k += 1
    for ch in range(t.C2):
        off[t.Km + ch] = t.t0 + ch * t.Rs * t.Wt
    cdef floating *tile
    cdef floating *pre_or_dst = <floating*>e.pre if e.pre != NULL else y
    cdef int nt = _conv_threads(g, ntasks, nthreads)
    cdef int64_t nblk = g.G * (t.Mv // 16), bk
    with parallel(num_threads=nt):
        # the weights packed by the threads (at batch 1 a serial pack of 64x288 weights was a third of the
        # conv's time); the prange's barrier orders it before the tasks
        for bk in prange(nblk, schedule="static"):
            _ocv_pack(dummy, &t, bk, w, <const floating*>sc.w2, wt)
        tile = slots + threadid() * g.panel
        for k in prange(ntasks, schedule="static"):
            _ocv_task(dummy, &t, k, g.G, x, wt, y, pre_or_dst, e, off, tile, tile + t.tile_n, sc)
    return 0


cdef void _ocv_pack(floating dummy, const _og *t, int64_t bk, const floating *w, const floating *w2,
                    floating *wt) noexcept nogil:
    """Weight block bk = (group, 16 output channels) into wt[g][m // 16][k][m % 16] (zero past Co): k < Km
    from w, then (conv_shortcut) k - Km < C2 from w2 (Co x C2)."""
    cdef int64_t gr = bk // (t.Mv // 16), m0 = (bk % (t.Mv // 16)) * 16, k, l, m
    cdef floating *o = wt + gr * t.Kc * t.Mv + m0 * t.Kc
    cdef const floating *src
    for l in range(16):
        m = m0 + l
        if m < t.Co:
            src = w + (gr * t.Co + m) * t.Km
            for k in range(t.Km):
                o[k * 16 + l] = src[k]
            for k in range(t.C2):
                o[(t.Km + k) * 16 + l] = w2[m * t.C2 + k]
        else:
            for k in range(t.Kc):
                o[k * 16 + l] = 0


cdef void _ocv_task(floating dummy, const _og *t, int64_t k, int64_t G, const floating *x, const floating *wt,
                    floating *dst, floating *pre_or_dst, const _cepi *e, const int64_t *off, floating *tile,
                    floating *outT, const _csc *sc) noexcept nogil:
    cdef int64_t rbi = k % t.nrb, ng = k // t.nrb
    cdef int64_t n = ng // G, gr = ng % G
    cdef int64_t u0 = rbi * t.rb, nrows = min(t.rb, t.U - u0), m, v, P = nrows * t.V
    cdef const floating *src = x + (n * G + gr) * t.Ci * t.Hi * t.Wi
    cdef floating *o
    cdef floating *yr
    cdef const floating *tl = src + u0 * t.sh * t.Wi
    cdef const floating *xr
    cdef int64_t c, r
    cdef floating *so
    # conv_shortcut: the block's shortcut inputs where the kernel's taps address them (the rest of the
    # region is never read: pixels past P repeat pixel P - 1)
    for c in range(t.C2):
        so = tile + t.t0 + c * t.Rs * t.Wt
        for r in range(nrows):
            xr = <const floating*>sc.x2 + ((n * t.C2 + c) * sc.H2 + (u0 + r) * sc.s2h) * sc.W2
            for v in range(t.V):
                so[r * t.sh * t.Wt + v * t.sw] = xr[v * sc.s2w]
    if floating is float:
        if not t.inplace:
            lm_conv_build_pad_f32(src, t.Ci, t.Hi, t.Wi, u0 * t.sh - t.ph, t.Rt, t.pw, t.Wt, t.t0, tile)
            tl = tile
        lm_conv_ocv_f32(t.Mv, P, t.V, t.sh, t.sw, t.Wt, t.Kc, wt + gr * t.Kc * t.Mv, off, tl, outT)
    else:
        if not t.inplace:
            lm_conv_build_pad_f64(src, t.Ci, t.Hi, t.Wi, u0 * t.sh - t.ph, t.Rt, t.pw, t.Wt, t.t0, tile)
            tl = tile
        lm_conv_ocv_f64(t.Mv, P, t.V, t.sh, t.sw, t.Wt, t.Kc, wt + gr * t.Kc * t.Mv, off, tl, outT)
    # the block's rows of each channel are contiguous in y: transposed in, then one epilogue per channel
    # over them (per row, an 8x8 image's 8-element rows made the epilogue's fixed cost 3 ms of W8 at batch
    # 256)
    o = pre_or_dst + ((n * G + gr) * t.Co * t.U + u0) * t.V
    if floating is float:
        lm_conv_ocv_unpack_f32(t.Mv, t.Co, P, outT, o, t.U * t.V)
    else:
        lm_conv_ocv_unpack_f64(t.Mv, t.Co, P, outT, o, t.U * t.V)
    if not _has_epi(e):
        return
    for m in range(t.Co):
        o = pre_or_dst + (((n * G + gr) * t.Co + m) * t.U + u0) * t.V
        yr = dst + (((n * G + gr) * t.Co + m) * t.U + u0) * t.V
        _conv_epi_row(dummy, e, gr * t.Co + m, o, yr, P)
