"""Worker process of a multi-process simnet: ``python -m silomesh.simnet.worker PLAN SHARE``.

Runs the peers of ``plan.json`` assigned to ``SHARE`` (see :mod:`silomesh.simnet.runner`)
until the coordinator writes ``run/stop`` or its peers have all returned, then writes
``run/worker-SHARE.json`` with what it injected and observed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        sys.stderr.write("usage: python -m silomesh.simnet.worker PLAN_JSON SHARE\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import trio

    from silomesh.simnet.plan import Plan
    from silomesh.simnet.runner import ShareRunner
    from silomesh.simnet.runtime import STOP_FILE, limit_torch_threads, quiet_expected_dial_errors

    plan = Plan.load(Path(args[0]))
    share = int(args[1])
    limit_torch_threads()
    quiet_expected_dial_errors()
    stop_file = plan.run_dir / STOP_FILE
    runner = ShareRunner(plan, share, stop=stop_file.exists)
    trio.run(runner.run)
    out = plan.run_dir / f"worker-{share}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(runner.results().to_json()), encoding="utf-8")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
