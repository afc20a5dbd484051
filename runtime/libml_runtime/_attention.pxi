# Attention kernels (format 2.3 opcode 44): included by _exec.pyx.  See format.py for the fields and
# libml_compile/ops_attention.py for the compiler side.

cdef int _softmax_masked(floating dummy, const int64_t *f, char **bases, const double *consts,
                         int nthreads) noexcept nogil:
    """softmax_masked: per row, v = x + m (mode 0) or a select between x and consts[fill] on m != 0 (modes
    1, 2), written to y, then the softmax opcode's row kernel in place on y (its arithmetic, so the fused
    op equals the unfused add / where + softmax bit for bit).  One row per task."""
    cdef int64_t nd = f[LM_F_SOFTMAX_MASKED_ndim], mode = f[LM_F_SOFTMAX_MASKED_mode]
    cdef const int64_t *dims = f + LM_F_SOFTMAX_MASKED_dims
    cdef const int64_t *ms = f + LM_F_SOFTMAX_MASKED_m_stride(f)
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_SOFTMAX_MASKED_x_slot(f))
    cdef floating *m = <floating*>_ptr(bases, f + LM_F_SOFTMAX_MASKED_m_slot(f))
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_SOFTMAX_MASKED_y_slot(f))
    cdef floating fill = <floating>consts[f[LM_F_SOFTMAX_MASKED_fill(f)]]
    cdef int64_t K = dims[nd - 1], sk = ms[nd - 1], outer = 1, o, r, j, k, moff
    cdef floating *xr
    cdef floating *yr
    cdef floating *mr
    cdef int nt
    for j in range(nd - 1):
        outer *= dims[j]
    if outer * K == 0:
        return 0
    nt = _threads(outer * K, nthreads)
    for o in prange(outer, schedule="static", nogil=True, num_threads=nt):
        # the mask row of row o: o unravelled over the leading dims, times the mask's strides
        moff = 0
        r = o
        for j in range(nd - 2, -1, -1):
            moff = moff + (r % dims[j]) * ms[j]
            r = r // dims[j]
        xr = x + o * K
        yr = y + o * K
        mr = m + moff
        if mode == 0:
            for k in range(K):
                yr[k] = xr[k] + mr[k * sk]
        elif mode == 1:
            for k in range(K):
                yr[k] = xr[k] if mr[k * sk] != 0 else fill
        else:
            for k in range(K):
                yr[k] = fill if mr[k * sk] != 0 else xr[k]
        if floating is float:
            lm_softmax_outer_f32(K, 1, yr, yr, <float*>NULL)
        else:
            lm_softmax_outer_f64(K, 1, yr, yr, <double*>NULL)
    return 0
