# Data-parallel collectives (format.py opcodes 66-67: allreduce_start, allreduce_wait), included by _exec.pyx.
#
# MPI is not a build-time dependency: the three MPI functions are called through pointers that
# ``executable.py`` looks up in the libmpi mpi4py has loaded (ctypes), together with the communicator, datatype,
# op, MPI_IN_PLACE and MPI_REQUEST_NULL handles, handed to ``MPIContext`` once per Executable.  Handles are
# passed as pointer-sized integers: Open MPI's are pointers, MPICH's ints, and either travels in one
# general-purpose register on x86-64 and aarch64.  Requests live in slots of REQ_BYTES bytes each, statuses are
# written into one scratch buffer of the library's sizeof(MPI_Status): neither assumes an implementation.
# Every call is made by the thread running the plan, outside any OpenMP region, with the GIL released.

from libc.stdint cimport intptr_t

ctypedef int (*lm_mpi_iallreduce_t)(const void *sendbuf, void *recvbuf, int count, intptr_t dtype, intptr_t op,
                                     intptr_t comm, void *request) noexcept nogil
ctypedef int (*lm_mpi_wait_t)(void *request, void *status) noexcept nogil
ctypedef int (*lm_mpi_test_t)(void *request, int *flag, void *status) noexcept nogil

DEF REQ_BYTES = 16  # >= sizeof(MPI_Request) of every implementation (8 in Open MPI, 4 in MPICH)

cdef struct lm_mpi:
    lm_mpi_iallreduce_t iallreduce
    lm_mpi_wait_t wait
    lm_mpi_test_t test
    intptr_t comm, op_sum, in_place, req_null
    intptr_t dt[2]          # the MPI datatype of plan dtype 0 (float32) and 1 (float64)
    int64_t nreq
    char *reqs              # nreq slots of REQ_BYTES
    unsigned char *pending  # per slot: 1 between its start and its wait
    int64_t npending
    char *status
    int last_error          # the MPI error code of the last failed call (0: none; -1: a wait timed out)
    double timeout          # seconds an allreduce_wait waits for its request (<= 0: no limit)


cdef class MPIContext:
    """The MPI entry points and handles one Executable's plans use (see executable.MPIBinding): function
    addresses and handles as integers, ``nreq`` request slots.  Holds no reference to mpi4py."""
    cdef lm_mpi c

    def __cinit__(self, intptr_t iallreduce, intptr_t wait, intptr_t test, intptr_t comm, intptr_t op_sum,
                  intptr_t dt_float, intptr_t dt_double, intptr_t in_place, intptr_t req_null,
                  int64_t nreq, int64_t status_bytes):
        cdef int64_t i
        if not iallreduce or not wait or not test:
            raise ValueError("MPIContext: an MPI function address is NULL")
        if nreq < 0 or nreq > 1 << 20 or status_bytes < 0 or status_bytes > 4096:
            raise ValueError(f"MPIContext: nreq {nreq} or status_bytes {status_bytes} out of range")
        memset(&self.c, 0, sizeof(lm_mpi))
        self.c.iallreduce = <lm_mpi_iallreduce_t>iallreduce
        self.c.wait = <lm_mpi_wait_t>wait
        self.c.test = <lm_mpi_test_t>test
        self.c.comm, self.c.op_sum, self.c.in_place, self.c.req_null = comm, op_sum, in_place, req_null
        self.c.dt[0], self.c.dt[1] = dt_float, dt_double
        self.c.nreq = nreq
        self.c.reqs = <char*>calloc(max(nreq, 1), REQ_BYTES)
        self.c.pending = <unsigned char*>calloc(max(nreq, 1), 1)
        self.c.status = <char*>calloc(max(status_bytes, 64), 1)
        if self.c.reqs == NULL or self.c.pending == NULL or self.c.status == NULL:
            raise MemoryError()
        for i in range(nreq):
            (<intptr_t*>(self.c.reqs + i * REQ_BYTES))[0] = req_null

    def __dealloc__(self):
        free(self.c.reqs)
        free(self.c.pending)
        free(self.c.status)

    @property
    def npending(self):
        """Requests started and not yet waited for (non-zero only after a call stopped with an error)."""
        return self.c.npending

    @property
    def last_error(self):
        """The MPI error code of the last MPI call that failed (0: none; -1: an allreduce_wait timed out)."""
        return self.c.last_error

    @property
    def timeout(self):
        """Seconds an allreduce waits for the other ranks before the call fails (<= 0: no limit)."""
        return self.c.timeout

    @timeout.setter
    def timeout(self, double seconds):
        self.c.timeout = seconds


cdef inline void _mpi_progress(lm_mpi *m) noexcept nogil:
    """MPI_Test every pending request once: non-blocking collectives advance only inside MPI calls (Open MPI
    has no progress thread by default), so the interpreter pokes them between instructions."""
    cdef int64_t r
    cdef int flag = 0
    for r in range(m.nreq):
        if m.pending[r]:
            m.test(m.reqs + r * REQ_BYTES, &flag, m.status)


cdef int _allreduce_start(floating dummy, const int64_t *f, char **bases, lm_mpi *m) noexcept nogil:
    cdef int64_t req = f[LM_F_ALLREDUCE_START_req], n = f[LM_F_ALLREDUCE_START_n]
    cdef int64_t np_ = f[LM_F_ALLREDUCE_START_nparts], i, k, pos = 0
    cdef floating *buf = <floating*>_ptr(bases, f + LM_F_ALLREDUCE_START_buf_slot)
    cdef const int64_t *q
    cdef int rc
    if m == NULL or req >= m.nreq or m.pending[req]:
        return ERR_MALFORMED  # (Executable binds a context to every plan with collectives; validate orders them)
    for i in range(np_):
        q = f + LM_F_ALLREDUCE_START_part + LM_W_ALLREDUCE_START_part(f) * i
        k = q[LM_R_ALLREDUCE_START_part_n(f)]
        memcpy(buf + pos, _ptr(bases, q + LM_R_ALLREDUCE_START_part_src_slot(f)), <size_t>(k * sizeof(floating)))
        pos += k
    rc = m.iallreduce(<void*>m.in_place, buf, <int>n, m.dt[0 if floating is float else 1], m.op_sum, m.comm,
                      m.reqs + req * REQ_BYTES)
    if rc != 0:
        m.last_error = rc
        return ERR_MALFORMED
    m.pending[req] = 1
    m.npending += 1
    return 0


cdef int _allreduce_wait(floating dummy, const int64_t *f, char **bases, const double *consts,
                         lm_mpi *m) noexcept nogil:
    cdef int64_t req = f[LM_F_ALLREDUCE_WAIT_req]
    cdef int64_t np_ = f[LM_F_ALLREDUCE_WAIT_nparts], i, j, k, pos = 0
    cdef floating scale = <floating>consts[f[LM_F_ALLREDUCE_WAIT_scale]]
    cdef const floating *buf = <const floating*>_ptr(bases, f + LM_F_ALLREDUCE_WAIT_buf_slot)
    cdef floating *dst
    cdef const int64_t *q
    cdef int rc
    if m == NULL or req >= m.nreq or not m.pending[req]:
        return ERR_MALFORMED
    # MPI_Test until done (what MPI_Wait does inside Open MPI), but with a deadline: a rank that raised an
    # exception it caught, or stopped stepping, never joins this allreduce, and MPI_Wait would block its
    # peers for ever.  On a timeout the request stays pending (the executable then refuses further calls).
    cdef int flag = 0
    cdef double t0 = omp_get_wtime()
    cdef int64_t spins = 0
    while True:
        rc = m.test(m.reqs + req * REQ_BYTES, &flag, m.status)
        if rc != 0 or flag:
            break
        spins += 1
        if m.timeout > 0 and (spins & 1023) == 0 and omp_get_wtime() - t0 > m.timeout:
            m.last_error = -1
            return ERR_MALFORMED
    m.pending[req] = 0
    m.npending -= 1
    if rc != 0:
        m.last_error = rc
        return ERR_MALFORMED
    for i in range(np_):
        q = f + LM_F_ALLREDUCE_WAIT_part + LM_W_ALLREDUCE_WAIT_part(f) * i
        k = q[LM_R_ALLREDUCE_WAIT_part_n(f)]
        dst = <floating*>_ptr(bases, q + LM_R_ALLREDUCE_WAIT_part_dst_slot(f))
        for j in range(k):
            dst[j] = buf[pos + j] * scale
        pos += k
    return 0
