"""``python -m libml_compile.conformance [-v]``: how many of the official ONNX node test cases libml passes.

The cases are every one ``onnx.backend.test.case.node.collect_testcases()`` yields (the onnx wheel's own
operator tests).  Each is either run through ``libml_compile.onnx_backend`` (import_onnx -> compile -> run,
compared at the case's tolerances) or skipped for one stated reason: an operator libml does not import
(not in ``onnx_import.SUPPORTED_OPS``), or an exclusion of ``backend.discover_conformance_cases`` (an
element type libml has no dtype for, an integer result of a floating-point-only operator, a non-tensor
input).  Prints one summary line::

    N of M official ONNX node cases pass (K skipped as ...; F fail)

then the skip reasons with their counts, and ``FAIL name: error`` per failing case.  Exit status 1 when a
run case fails.  ``-v`` also lists the passing cases.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Optional, Tuple

__all__ = ["conformance", "main"]

UNSUPPORTED_OP_REASON = "an operator libml does not import"


def conformance() -> Tuple[int, int, Dict[str, List[str]], Dict[str, str], List[str]]:
    """Run the official node cases: ``(passed, total, skipped {reason: [case]}, failed {case: error},
    passing case names)``."""
    from . import onnx_backend as backend
    from .onnx_import import SUPPORTED_OPS

    cases = backend.load_node_cases()
    runnable, excluded = backend.discover_conformance_cases(cases)
    considered = {c[0] for c in runnable} | set(excluded)
    skipped: Dict[str, List[str]] = {}
    for c in cases:
        if c[0] not in considered:
            ops = sorted({n.op_type for n in c[1].graph.node} - set(SUPPORTED_OPS))
            assert ops, f"{c[0]}: neither run nor excluded, yet every operator is supported"
            skipped.setdefault(UNSUPPORTED_OP_REASON, []).append(c[0])
    for name, reason in excluded.items():
        skipped.setdefault(reason, []).append(name)
    failed: Dict[str, str] = {}
    passing: List[str] = []
    for case in runnable:
        try:
            backend.run_conformance_case(case)
        except Exception as e:  # noqa: BLE001 - reported per case
            failed[case[0]] = f"{type(e).__name__}: {e}"
        else:
            passing.append(case[0])
    return len(passing), len(cases), skipped, failed, passing


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import onnx
    passed, total, skipped, failed, passing = conformance()
    n_skip = sum(len(v) for v in skipped.values())
    # the reason up to its first parenthesis or semicolon: the details follow on their own lines
    parts = [f"{len(v)} as {re.split(r' [(]|; ', r)[0]}" for r, v in sorted(skipped.items(), key=lambda kv: -len(kv[1]))]
    print(f"{passed} of {total} official ONNX node cases pass ({n_skip} skipped: {'; '.join(parts)}; "
          f"{len(failed)} fail) [onnx {onnx.__version__}]")
    for r, v in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(v):5d} skipped: {r}" + (f" ({', '.join(v)})" if len(v) <= 4 else ""))
    if "-v" in argv:
        for n in passing:
            print(f"PASS {n}")
    for k, v in failed.items():
        print(f"FAIL {k}: {v}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
