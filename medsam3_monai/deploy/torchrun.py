"""``python -m medsam3_monai.deploy.torchrun ARGS``: torchrun (``torch.distributed.run``, the same arguments) as
``medsam3 train --nproc N`` starts it.

When every failed rank ended with an input error (status 2: the rank printed its one line,
``bundle.report_input_errors``) or was interrupted (130), the launcher ends with that status and nothing more,
instead of torchrun's ``ChildFailedError`` report (40 lines of its own traceback and a failure table that names no
file). Any other failure keeps torchrun's report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: rank exit statuses whose rank has said why (an input error's one line; Ctrl-C)
SAID_BY_THE_RANKS = (2, 130)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as failed:
        statuses = {int(failure.exitcode) for failure in failed.failures.values()}
        if len(statuses) == 1 and statuses <= set(SAID_BY_THE_RANKS):
            return statuses.pop()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
