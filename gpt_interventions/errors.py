"""Bad input and failed runs: one line on stderr and an exit status, never a traceback.

Scripts wrap `main` in `run_main`: UsageError (bad input, nothing written) exits 2; RunError (a run
that cannot go on) and a full or read-only disk exit 1.
"""

import errno
import sys


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2, nothing written."""


class RunError(Exception):
    """A run that cannot go on (diverged): printed as one line, exit status 1."""


def run_main(main, argv=None):
    """Call main(argv); turn UsageError into one line and exit 2, RunError and a full or read-only
    disk into one line and exit 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UsageError, RunError) as e:
        one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")  # an argument can hold a newline
        print(f"error: {one_line}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # anything else is a bug: traceback
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where} ({e.strerror}); free space or choose another output directory, "
              "then run again", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
