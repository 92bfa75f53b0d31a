"""``python -m medsam3_monai.deploy.torchrun ARGS``: torchrun (``torch.distributed.run``, the same arguments) as
``medsam3 train --nproc N`` starts it.

Ctrl-C (or a SIGTERM) reaching the launcher ends it with the shell's status for that signal (130, 143) and no
traceback: the ranks stop with it, and ``medsam3 train`` says which checkpoint the same command resumes from.

When every failed rank ended with an input error (status 2: the rank printed its one line,
``bundle.report_input_errors``) or was interrupted (130), the launcher ends with that status and nothing more,
instead of torchrun's ``ChildFailedError`` report (40 lines of its own traceback and a failure table that names no
file); ranks that torchrun stopped because another failed first (SIGTERM) are part of that, and so are ranks whose
error came after a peer had said its line (DDP's "Connection reset by peer" once that peer is gone: they end with
status 2 and say nothing, ``bundle._a_rank_said_why``). Any other failure keeps torchrun's report. An error line
that several ranks meet (a bad file every rank reads) is said once: the ranks mark what they said in a temporary
folder (``bundle.SAID_ONCE_VARIABLE``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any

#: rank exit statuses whose rank has said why (an input error's one line; Ctrl-C)
SAID_BY_THE_RANKS = (2, 130)


def said_status(failed: Any) -> int | None:
    """The status to end with when the ranks said why they failed (a ``ChildFailedError``), else None: the first
    failure's status is one of ``SAID_BY_THE_RANKS``, and every other failed rank ended with it too or was stopped by
    torchrun's SIGTERM after that first failure (it stops the others as soon as one rank fails)."""
    _, first = failed.get_first_failure()
    status = int(first.exitcode)
    others = {int(failure.exitcode) for failure in failed.failures.values()}
    if status in SAID_BY_THE_RANKS and others <= {status, -signal.SIGTERM}:
        return status
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import os
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from ..bundle import SAID_ONCE_VARIABLE

    with tempfile.TemporaryDirectory(prefix="medsam3-said-") as said:
        before = os.environ.get(SAID_ONCE_VARIABLE)
        os.environ[SAID_ONCE_VARIABLE] = said  # the ranks inherit it
        try:
            run(parse_args(list(sys.argv[1:] if argv is None else argv)))
        except ChildFailedError as failed:
            status = said_status(failed)
            if status is None:
                raise
            return status
        except SignalException as stopped:  # the launcher's own Ctrl-C / SIGTERM: torchrun has stopped the ranks
            return 128 + int(stopped.sigval)
        finally:
            if before is None:
                os.environ.pop(SAID_ONCE_VARIABLE, None)
            else:
                os.environ[SAID_ONCE_VARIABLE] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
