"""Constants shared by the compiler's lowering and the runtime: opcodes, dtype codes, VM opcodes, errors.

The int64 code layout of every opcode is documented next to its kernel in ``_exec.pyx`` and decoded
field by field by ``plan.validate``.
"""
import numpy as np

# instruction opcodes
OP_EW, OP_GEMM, OP_SOFTMAX, OP_XENT, OP_XENT_GRAD, OP_CAST, OP_INT_EW, OP_COPY, OP_STRIDED_COPY, \
    OP_SGD, OP_ADAM, OP_CHECK_FINITE, OP_ADAM_APPLY, OP_COPY_ND, OP_GATHER, OP_SCATTER_ADD = range(1, 17)
OP_NAMES = {OP_EW: "fused_elementwise", OP_GEMM: "gemm", OP_SOFTMAX: "softmax", OP_XENT: "softmax_xent",
            OP_XENT_GRAD: "xent_grad", OP_CAST: "cast", OP_INT_EW: "int_elementwise", OP_COPY: "copy",
            OP_STRIDED_COPY: "strided_copy", OP_SGD: "sgd_update", OP_ADAM: "adam_update",
            OP_CHECK_FINITE: "check_finite", OP_ADAM_APPLY: "adam_apply", OP_COPY_ND: "copy_nd",
            OP_GATHER: "gather", OP_SCATTER_ADD: "scatter_add"}
HEADER = 3  # opcode, length, node id

# register-VM opcodes (kernels.h enum).  A program step is VM_WIDTH int64s: op dst a b c.  `a` is a
# register; `b` and `c` are registers or, when negative, the constant consts[-v-1].  The last five are
# superinstructions the lowering forms from a producer with a single use, so the intermediate never
# makes a round trip through the register file (each such trip costs about as much as a multiply):
#   FMA a*b+c   FMS a*b-c   FNMA c-a*b   MULSUB a*(b-c)   MASK a*step(b)
#   ADDRELU relu(a+b)   SUBRELU relu(a-b)   MULMASK a*b*step(c)   DIVMASK (a/b)*step(c)
VM_OPS = {"COPY": 0, "ADD": 1, "SUB": 2, "MUL": 3, "DIV": 4, "RSUB": 5, "RDIV": 6, "NEG": 7, "RELU": 8,
          "SIGMOID": 9, "EXP": 10, "LOG": 11, "STEP": 12,
          "FMA": 13, "FMS": 14, "FNMA": 15, "MULSUB": 16, "MASK": 17,
          "ADDRELU": 18, "SUBRELU": 19, "MULMASK": 20, "DIVMASK": 21}
VM_ARITY = {VM_OPS[k]: n for n, names in ((1, "COPY NEG RELU SIGMOID EXP LOG STEP"),
                                           (2, "ADD SUB MUL DIV RSUB RDIV MASK ADDRELU SUBRELU"),
                                           (3, "FMA FMS FNMA MULSUB MULMASK DIVMASK")) for k in names.split()}
VM_WIDTH = 5
LM_BLK, LM_MAXD, LM_MAXIO, LM_MAXREG, LM_MAXCHUNK = 128, 8, 32, 64, 16

# dtype codes (kernels.h enum)
DTYPES = ["float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
ITEMSIZE = [np.dtype(d).itemsize for d in DTYPES]

# slots
SLOT_ARENA, SLOT_STATE, SLOT_INPUT0 = 0, 1, 2

# run_plan error codes
ERR_MALFORMED, ERR_OPCODE, ERR_INT_DIV_ZERO, ERR_NOMEM, ERR_LABEL, ERR_INDEX, ERR_NONFINITE = \
    -1, -2, -3, -4, -10, -11, -20

ALIGN = 64
