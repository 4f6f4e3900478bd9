"""Exit codes of every ``cxr-sr`` command, one table for scripts to trust.

======  =================================================================================
code    meaning
======  =================================================================================
0       every input was done (or skipped on purpose, e.g. already done in a resumed run)
1       some inputs failed; the count is printed and every failure is in the report
2       usage error (bad flags or arguments; argparse's own code)
3       the Triton server or the PACS could not be reached (nothing, or not all, was done)
======  =================================================================================
"""

EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

EXIT_CODES = {
    EXIT_OK: "all inputs done",
    EXIT_INPUT_FAILED: "some inputs failed (count printed, details in the report)",
    EXIT_USAGE: "usage error",
    EXIT_UNREACHABLE: "server or PACS unreachable",
}
